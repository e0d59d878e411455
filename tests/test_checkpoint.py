"""DCP checkpoints with real processes: exact resume, resharding, crashes, retention, async save."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    base_tables,
    free_port,
    load_final_weights,
    main_in_process,
    read_metrics,
    run_sweep,
    run_training,
    train_rows,
    write_recipe,
)

pytestmark = pytest.mark.slow

TIMING = {"tokens_per_s", "positions_per_s", "mfu", "peak_mem_gib"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"]["eval"] = []
    tables["training"].update(max_steps=6, micro_batch_size=2)
    tables["checkpoint"] = {"interval_steps": 2, "keep_last": 2}
    return write_recipe(tmp / "ckpt.toml", tables)


def _run(recipe: Path, out: Path, nproc: int, extra: list[str] = (), expect_ok: bool = True, **kwargs):
    proc = run_training(recipe, [f"job.output_dir={out}", *extra], nproc=nproc, **kwargs)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        assert proc.returncode != 0
    return proc


def _kill(at: int, rank: int, marker: Path) -> dict:
    return {"FSDPO_FAULT_KILL": f"{at}:{rank}:{marker}"}


@pytest.fixture(scope="module")
def crashed(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path]]:
    """The interrupted runs the resume tests start from, (exit code, output folder) by name: rank 1
    of 2 killed after step 3 ("2"), the one rank of 1 killed after step 3 ("1"), and a crash of 2
    ranks inside the save of step 4 ("in_save")."""
    runs = {}
    for name, nproc, env in (
        ("2", 2, lambda tmp: _kill(3, 1, tmp / "killed")),
        ("1", 1, lambda tmp: _kill(3, 0, tmp / "killed")),
        ("in_save", 2, lambda tmp: {"FSDPO_FAULT_KILL_IN_SAVE": "4"}),
    ):
        tmp = tmp_path_factory.mktemp(f"crashed-{name}")
        proc = _run(recipe, tmp / "run", nproc, expect_ok=False, env=env(tmp), forked=True)
        runs[name] = (proc.returncode, tmp / "run")
    return runs


# on 2 ranks in one launch: the name of the run, the crashed run it resumes (None: a fresh run),
# its overrides
ON_TWO = {
    "straight": (None, []),
    "stop": ("2", []),
    "from_1": ("1", []),
    "in_save": ("in_save", []),
    "async": (None, ["checkpoint.async_save=true"]),
}


@pytest.fixture(scope="module")
def on_two(recipe: Path, crashed: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs of ON_TWO, a copy of its crashed run resumed (rerun as the same command) or a fresh
    run, in one two-rank launch (tests/scripts/sweep.py): the folder of their folders."""
    out = tmp_path_factory.mktemp("on-two")
    for name, (source, _) in ON_TWO.items():
        if source is not None:
            shutil.copytree(crashed[source][1], out / name)
    run_sweep(recipe, out, {name: overrides for name, (_, overrides) in ON_TWO.items()}, nproc=2)
    return out


@pytest.fixture(scope="module")
def straight(on_two: Path) -> Path:
    """The uninterrupted run on 2 ranks."""
    return on_two / "straight"


def _resumed(on_two: Path, name: str) -> tuple[Path, str]:
    """The folder of the ON_TWO run `name` and the launch's line saying where it resumed from."""
    out = on_two / name
    prefix = f"resumed from {out / 'checkpoints'}/"
    lines = [line for line in (on_two / "stdout.txt").read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, lines
    return out, lines[0]


def _same_rows_after(a: Path, b: Path, step: int, exact: bool) -> None:
    rows_a = [r for r in train_rows(a) if r["step"] > step]
    rows_b = [r for r in train_rows(b) if r["step"] > step]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] and rows_a
    for ra, rb in zip(rows_a, rows_b):
        for key in ra.keys() - TIMING:
            if exact:
                assert ra[key] == rb[key], (key, ra, rb)
            else:
                assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-6), (key, ra, rb)


def _assert_weights(a: Path, b: Path, exact: bool) -> None:
    wa, wb = load_final_weights(a), load_final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


def test_retention_keeps_exactly_keep_last(straight: Path) -> None:
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == ["step-4", "step-6"]
    assert all((straight / "checkpoints" / n / "COMPLETE").is_file() for n in names)


def test_stop_and_resume_is_bitwise_identical(crashed: dict, on_two: Path, straight: Path) -> None:
    code, killed = crashed["2"]
    assert code != 0
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2"]
    out, line = _resumed(on_two, "stop")
    assert "step 2" in line
    _assert_weights(straight, out, exact=True)
    _same_rows_after(straight, out, 2, exact=True)
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5, 6]  # no duplicated rows


def test_sigkill_under_max_restarts_completes_identically(
    recipe: Path, straight: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _run(
        recipe,
        out,
        2,
        env=_kill(5, 1, tmp_path / "killed"),
        torchrun_args=[f"--master_port={free_port()}", "--max-restarts=2"],
    )
    assert (tmp_path / "killed").exists() and "resumed from" in proc.stdout
    _assert_weights(straight, out, exact=True)
    _same_rows_after(straight, out, 4, exact=True)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(
    recipe: Path, crashed: dict, on_two: Path, straight: Path, tmp_path: Path, world, first: int, second: int
) -> None:
    code, killed = crashed[str(first)]
    assert code != 0
    if second == 1:  # this process is one rank
        out = tmp_path / "run"
        shutil.copytree(killed, out)
        proc = main_in_process(recipe, [f"job.output_dir={out}"])
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "resumed from" in proc.stdout
    else:
        out, _ = _resumed(on_two, "from_1")
    _same_rows_after(straight, out, 2, exact=False)
    _assert_weights(straight, out, exact=False)


def test_crash_inside_save_resumes_from_the_previous_checkpoint(
    crashed: dict, on_two: Path, straight: Path
) -> None:
    code, killed = crashed["in_save"]
    assert code != 0
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == [".step-4.incomplete", "step-2"]  # the half-written one is not a checkpoint
    out, line = _resumed(on_two, "in_save")
    assert "step-2" in line
    _assert_weights(straight, out, exact=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_async_save_writes_the_same_checkpoints(on_two: Path, straight: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = on_two / "async"
    for name in ("step-4", "step-6"):
        dcp_to_torch_save(straight / "checkpoints" / name, tmp_path / f"sync-{name}.pt")
        dcp_to_torch_save(out / "checkpoints" / name, tmp_path / f"async-{name}.pt")
        sync = torch.load(tmp_path / f"sync-{name}.pt", weights_only=False)
        asyn = torch.load(tmp_path / f"async-{name}.pt", weights_only=False)
        flat_sync, flat_async = _flatten(sync), _flatten(asyn)
        assert flat_sync.keys() == flat_async.keys() and len(flat_sync) > 10
        for key, value in flat_sync.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, flat_async[key]), key
            else:
                assert value == flat_async[key], key
    _assert_weights(straight, out, exact=True)


def test_resume_never_refuses_to_overwrite_checkpoints(recipe: Path, straight: Path, world) -> None:
    proc = main_in_process(recipe, [f"job.output_dir={straight}", "checkpoint.resume=never"])
    assert proc.returncode == 2
    assert "job.output_dir" in proc.stderr and "already holds a run" in proc.stderr
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert len(read_metrics(straight)) == 6


def test_resume_with_another_global_batch_is_refused(
    recipe: Path, straight: Path, tmp_path: Path, world
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(straight, out)  # with its manifest: every file in it is fsdpo's
    resume = f"checkpoint.resume={out / 'checkpoints' / 'step-6'}"
    overrides = [f"job.output_dir={out}", resume, "training.max_steps=12", "training.global_batch_size=16"]
    proc = main_in_process(recipe, overrides)
    assert proc.returncode == 2 and "training.global_batch_size" in proc.stderr


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix: tree}


def test_export_tool_turns_a_checkpoint_into_the_final_model(straight: Path, tmp_path: Path) -> None:
    from engine.export import main

    assert main([str(straight / "checkpoints" / "step-6"), str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    exported = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        exported.update(load_file(f))
    final = load_final_weights(straight)
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert main([str(straight / "checkpoints" / "step-6"), str(tmp_path / "hf")]) == 2  # never overwrites
