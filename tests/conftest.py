"""Shared fixtures: a tiny saved model folder, small data files, recipe writing, launching runs.

Nothing is downloaded: the model is a random-init Llama saved with `save_pretrained` (so the real
loading path runs) next to the demo tokenizer shipped in recipes/assets/.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.metrics import MATMUL_PEAK_ENV, measure_matmul_flops
from engine.recipe import toml_value
from tests.forked import fork_launch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "recipes" / "assets"
LN2 = 0.6931471805599453


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the two cores: one thread each (tiny models gain nothing from a second
    # thread, and two workers x two threads oversubscribe the machine)
    torch.set_num_threads(1)


def _module_fixture_group(item: pytest.Item) -> str | None:
    """The module of `item` when it uses a module-scoped fixture defined there (a launch or a
    training run that several tests read), else None."""
    module = item.nodeid.split("::")[0]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        if defs and defs[-1].scope == "module" and defs[-1].baseid == module:
            return module
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """For the workers of `--dist loadgroup` (pyproject.toml): the tests that share a module
    fixture form one group, run by one worker, so that it is built once; the multi-process tier
    goes first, its largest groups first, so that the workers finish together."""
    groups = {item: _module_fixture_group(item) for item in items}
    sizes = Counter(groups.values())
    for item, group in groups.items():
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    order = {item: i for i, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple:
        group = groups[item]
        return (
            item.get_closest_marker("slow") is None,
            -sizes[group] if group else 0,
            group or "",
            order[item],
        )

    items.sort(key=key)


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenisation caches (and anything else under XDG_CACHE_HOME) go to a temp folder, for
    this process and every run it launches."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (weights + config + tokenizer) built from the demo config."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"))


def save_random_llama(out: Path, config_changes: dict[str, Any] | None = None, std: float = 0.08) -> Path:
    """Save into `out` a random-init Llama of the demo config (with `config_changes`), seed 0,
    its matrices drawn with `std` (larger than the default init, so that log-probs vary between
    pairs and steps), next to the demo tokenizer and generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    config.update(config_changes or {})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(out)
    shutil.copy(ASSETS / "tiny-llama" / "generation_config.json", out / "generation_config.json")
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """64 training pairs and 12 eval pairs from the demo set, with varied lengths."""
    out = tmp_path_factory.mktemp("data")
    train = (ASSETS / "demo_train.jsonl").read_text().splitlines()[:64]
    evals = (ASSETS / "demo_eval.jsonl").read_text().splitlines()[:12]
    (out / "train.jsonl").write_text("\n".join(train) + "\n")
    (out / "eval.jsonl").write_text("\n".join(evals) + "\n")
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}


def write_recipe(path: Path, tables: dict[str, dict[str, Any]], extends: str | None = None) -> Path:
    lines = [f"extends = {json.dumps(extends)}"] if extends else []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_tables(model_dir: Path, data: dict[str, Path], output_dir: Path) -> dict[str, dict[str, Any]]:
    """A fast recipe on the tiny model: 8 pairs per step, 4 steps, fp32, lr large enough to move."""
    return {
        "job": {"output_dir": str(output_dir), "seed": 7},
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data["train"])], "eval": [str(data["eval"])], "max_length": 64},
        "loss": {"type": "dpo", "beta": 0.1},
        "training": {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 4},
        "optimizer": {"lr": 1e-3, "max_grad_norm": 1.0},
        "scheduler": {"type": "linear", "warmup_steps": 1},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(
    recipe: Path,
    overrides: list[str] = (),
    nproc: int = 1,
    timeout: int = 240,
    env: dict | None = None,
    torchrun_args: list[str] = (),
    forked: bool = False,
) -> subprocess.CompletedProcess:
    """Launch a real training run: torchrun with `nproc` ranks, or plain python for nproc=0;
    `forked`: `nproc` ranks forked from a warm process instead (tests/forked.py), for a test
    about the run rather than about torchrun."""
    if forked:
        args = [str(recipe), *overrides]
        return fork_launch("train", args, nproc, training_env(env), timeout, REPO)
    cmd = training_command(recipe, overrides, nproc, torchrun_args)
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=training_env(env)
    )


def main_in_process(recipe: Path, overrides: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`python torchrun_train.py RECIPE OVERRIDES` in this process, as the one rank of the `world`
    fixture's process group (which the caller requests; the run keeps it): the exit code and what
    it printed, as `run_training(..., nproc=0)` returns them, without a process's ~5 s start-up."""
    import engine.distributed
    import torchrun_train

    argv = [str(recipe), *overrides]
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        patch.setattr(engine.distributed, "shutdown", lambda: None)
        patch.chdir(REPO)
        code = torchrun_train.main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def training_command(
    recipe: Path, overrides: list[str] = (), nproc: int = 1, torchrun_args: list[str] = ()
) -> list[str]:
    if nproc == 0:
        return [sys.executable, str(REPO / "torchrun_train.py"), str(recipe), *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        *(torchrun_args or ["--standalone"]),
        str(REPO / "torchrun_train.py"),
        str(recipe),
        *overrides,
    ]


def training_env(env: dict | None = None) -> dict:
    """The environment of a launched run: one thread per rank, and this machine's one-thread
    matmul rate measured once here (each rank would spend ~1.3 s measuring the same)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", MATMUL_PEAK_ENV: one_thread_matmul_peak(), **(env or {})}


@functools.cache
def one_thread_matmul_peak() -> str:
    """FSDPO_MATMUL_PEAK for the launched ranks (engine.metrics.handed_down_peak): the fp32
    matmul rate of one thread, as a rank under OMP_NUM_THREADS=1 measures it at start-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return f"cpu:float32={measure_matmul_flops(torch.device('cpu'), torch.float32)}"
    finally:
        torch.set_num_threads(threads)


def launch_sweep(
    recipe: Path, out: Path, runs: dict[str, list[str] | dict], nproc: int, timeout: int = 400
) -> subprocess.CompletedProcess:
    """Train every variant in `runs` (overrides, or overrides and env: tests/scripts/sweep.py)
    within one launch of `nproc` forked ranks (tests/forked.py), each in `out`/its name, their
    results in `out`/results.json as each ends; the launch's stdout is kept in `out`/stdout.txt."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps(runs))
    args = [str(recipe), str(out), str(out / "runs.json")]
    proc = fork_launch("sweep", args, nproc, training_env(), timeout, REPO)
    (out / "stdout.txt").write_text(proc.stdout)
    return proc


def run_sweep(
    recipe: Path, out: Path, runs: dict[str, list[str] | dict], nproc: int, timeout: int = 400
) -> dict:
    """`launch_sweep`, which must succeed: the results of the runs by name."""
    proc = launch_sweep(recipe, out, runs, nproc, timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


def sweep_stdout(out: Path) -> dict[str, str]:
    """What rank 0 printed during each run of the `run_sweep` launch into `out`, by run name."""
    from tests.scripts.sweep import RUN_LINE

    parts = ("\n" + (out / "stdout.txt").read_text()).split(f"\n{RUN_LINE}")[1:]
    return dict(part.split("\n", 1) for part in parts)


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(output_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(output_dir) if "loss" in r]


def load_final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted((output_dir / "final").glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


@pytest.fixture(scope="session")
def world():
    """A one-rank gloo process group in the test process, for in-process engine tests."""
    from engine.distributed import init_distributed

    return init_distributed()


def data_mesh(world):
    """The device mesh the engine builds for `world` with the default `[parallel]` table."""
    from engine.config import ParallelConfig
    from engine.parallel import build_mesh

    return build_mesh(ParallelConfig(), world.world_size, world.ranks_per_node, world.device.type)


def every_position_logps(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(x[t+1] | x[<=t]) for every position of one row `ids` [1, T], through a
    SequenceLogprobs model (each position scored as its own one-token sequence)."""
    length = ids.shape[1]
    positions = torch.arange(length - 1)
    with torch.no_grad():
        counts = torch.ones(length - 1, dtype=torch.long)
        return model(ids, None, None, positions, ids[0, 1:], positions, counts).logps
