"""Sharding strategies (ZeRO 0-3 equivalents, HSDP), gradient-sync deferral, cross-strategy resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from engine.config import ParallelConfig
from engine.errors import UserError
from engine.parallel import defers_gradient_sync, reshard_after_forward
from tests.conftest import (
    base_tables,
    launch_sweep,
    load_final_weights,
    run_sweep,
    run_training,
    train_rows,
    write_recipe,
)

pytestmark = pytest.mark.slow

STRATEGIES = {
    "full": ["parallel.sharding=full"],
    "grad_op": ["parallel.sharding=grad_op"],
    "hybrid": ["parallel.sharding=hybrid"],
    "none": ["parallel.sharding=none"],
    "full_sync_last": ["parallel.sharding=full", "parallel.gradient_sync=last_micro_batch"],
    "none_sync_every": ["parallel.sharding=none", "parallel.gradient_sync=every_micro_batch"],
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("sharding")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"]["eval"] = []
    tables["training"].update(max_steps=5, micro_batch_size=1)  # 4 accumulation steps on 2 ranks
    tables["export"] = {"enabled": False}
    return write_recipe(tmp / "r.toml", tables)


# uninterrupted, with the checkpoints and the export of the resumed runs below (one more run of
# the two-rank sweep, not a launch of its own)
SAVED = ["checkpoint.interval_steps=2", "export.enabled=true"]
STRAIGHT = ["parallel.sharding=full", *SAVED]
RESUMES = [("full", "hybrid"), ("full", "none"), ("none", "full")]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep")


def _kill(marker: Path) -> dict[str, str]:
    """Rank 1 is killed after step 3 (the checkpoint of step 2 is the last one)."""
    return {"FSDPO_FAULT_KILL": f"3:1:{marker}"}


@pytest.fixture(scope="module")
def two_ranks(recipe: Path, sweep_dir: Path) -> tuple[int, dict]:
    """The two-rank launch: its exit code and the results of its uninterrupted runs by name. It
    ends with the killed run of `full`, the first strategy of RESUMES (the kill ends the launch)."""
    killed = {"overrides": [*SAVED, "parallel.sharding=full"], "env": _kill(sweep_dir / "k")}
    runs = {**STRATEGIES, "straight": STRAIGHT, "killed-full": killed}
    launch = launch_sweep(recipe, sweep_dir / "two", runs, nproc=2)
    assert (sweep_dir / "k").exists(), launch.stderr[-5000:]
    return launch.returncode, json.loads((sweep_dir / "two" / "results.json").read_text())


@pytest.fixture(scope="module")
def sweep(recipe: Path, sweep_dir: Path, two_ranks: tuple[int, dict]) -> dict:
    """The results of the uninterrupted runs by name, on 2 ranks and on 4."""
    four = run_sweep(
        recipe,
        sweep_dir / "four",
        {"hybrid_2x2": ["parallel.sharding=hybrid", "parallel.replicate_degree=2"]},
        nproc=4,
    )
    return two_ranks[1] | four


@pytest.mark.parametrize("name", [*STRATEGIES, "hybrid_2x2"])
def test_every_strategy_trains_to_the_same_losses(sweep: dict, name: str) -> None:
    reference = sweep["full"]["losses"]
    assert len(reference) == 5 and reference[0] != reference[-1]
    for a, b in zip(reference, sweep[name]["losses"]):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (name, reference, sweep[name]["losses"])


def test_local_state_bytes_per_strategy(sweep: dict) -> None:
    def total(name: str) -> int:
        return sum(sweep[name]["state_bytes"].values())

    none = sweep["none"]["state_bytes"]
    for name in ("full", "grad_op"):
        got = sweep[name]["state_bytes"]
        for part in ("params", "grads", "optimizer"):
            assert 0.45 <= got[part] / none[part] <= 0.55, (name, part, got, none)
    assert 0.45 <= total("full") / total("none") <= 0.55
    # 2 ranks on one node: hybrid defaults to one replica group, i.e. sharded like `full`
    assert sweep["hybrid"]["state_bytes"] == sweep["full"]["state_bytes"]


def test_gradient_sync_defaults_and_conflicts(recipe: Path) -> None:
    assert defers_gradient_sync(ParallelConfig(sharding="none"))
    assert not defers_gradient_sync(ParallelConfig(sharding="full"))
    assert reshard_after_forward(ParallelConfig(sharding="full"))
    assert not reshard_after_forward(ParallelConfig(sharding="grad_op"))
    from engine.recipe import load_config

    with pytest.raises(UserError, match=r"parallel\.reshard_after_forward=true conflicts"):
        load_config(recipe, ["parallel.sharding=grad_op", "parallel.reshard_after_forward=true"])
    with pytest.raises(UserError, match="replicate_degree"):
        load_config(recipe, ["parallel.replicate_degree=2"])


@pytest.fixture(scope="module")
def straight(sweep: dict, sweep_dir: Path) -> Path:
    return sweep_dir / "two" / "straight"


@pytest.fixture(scope="module")
def killed(
    recipe: Path, two_ranks: tuple[int, dict], sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, Path]]:
    """Under each first strategy of RESUMES, a run whose rank 1 was killed after step 3: (exit code,
    output folder). `full`'s ended the sweep's two-rank launch; `none`'s is a launch of its own."""
    tmp = tmp_path_factory.mktemp("killed-none")
    out = tmp / "run"
    overrides = [f"job.output_dir={out}", *SAVED, "parallel.sharding=none"]
    proc = run_training(recipe, overrides, nproc=2, env=_kill(tmp / "k"), forked=True)
    return {"full": (two_ranks[0], sweep_dir / "two" / "killed-full"), "none": (proc.returncode, out)}


@pytest.fixture(scope="module")
def resumed(recipe: Path, killed: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the killed run of each pair of RESUMES resumed under its second strategy, all
    in one two-rank launch (tests/scripts/sweep.py): the folder of the `first-second` runs."""
    out = tmp_path_factory.mktemp("resumed")
    runs = {}
    for first, second in RESUMES:
        shutil.copytree(killed[first][1], out / f"{first}-{second}")
        hybrid = ["parallel.replicate_degree=2"] if second == "hybrid" else []
        runs[f"{first}-{second}"] = [*SAVED, f"parallel.sharding={second}", *hybrid]
    run_sweep(recipe, out, runs, nproc=2)
    return out


@pytest.mark.parametrize("first,second", RESUMES)
def test_resume_across_strategies(
    killed: dict, resumed: Path, straight: Path, first: str, second: str
) -> None:
    code, killed_out = killed[first]
    assert code != 0 and (killed_out / "checkpoints" / "step-2" / "COMPLETE").exists()
    out = resumed / f"{first}-{second}"
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in (resumed / "stdout.txt").read_text()
    for a, b in zip(train_rows(straight), train_rows(out)):
        assert a["step"] == b["step"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6)
    wa, wb = load_final_weights(straight), load_final_weights(out)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-5)
