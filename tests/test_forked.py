"""The forked launcher of the multi-process tests (tests/forked.py) ends a launch as torchrun does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import base_tables, run_training, train_rows, write_recipe

pytestmark = pytest.mark.slow


def test_a_failing_rank_ends_the_launch_with_its_error_and_the_others_train(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict
) -> None:
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "unused")
    tables["training"]["micro_batch_size"] = 4
    recipe = write_recipe(tmp_path / "r.toml", tables)
    start = time.monotonic()
    failed = run_training(
        recipe,
        [f"job.output_dir={tmp_path / 'failed'}"],
        nproc=2,
        forked=True,
        env={"FSDPO_FAULT_USER_ERROR": "1"},
    )
    # rank 1's error reaches the caller, rank 0 (waiting in the start-up collective) is ended, exit 1
    assert failed.returncode == 1, failed.stderr
    assert "fsdpo: error: [rank 1] FSDPO_FAULT_USER_ERROR: an error injected on rank 1" in failed.stderr
    assert time.monotonic() - start < 60
    ok = run_training(recipe, [f"job.output_dir={tmp_path / 'ok'}"], nproc=2, forked=True)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert [row["step"] for row in train_rows(tmp_path / "ok")] == [1, 2, 3, 4]
    assert "step 4 | loss" in ok.stdout
