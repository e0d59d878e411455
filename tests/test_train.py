"""End-to-end runs with real processes (torchrun, gloo, 2 ranks) and the invariants they pin.

The runs are shared through module fixtures: each launches once and several tests read it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    LN2,
    base_tables,
    load_final_weights,
    main_in_process,
    read_metrics,
    run_sweep,
    sweep_stdout,
    train_rows,
    write_recipe,
)

pytestmark = pytest.mark.slow


NAN = {"FSDPO_FAULT_NAN_STEP": "2", "FSDPO_FAULT_NAN_RANK": "1"}


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict, world
) -> dict[str, Path]:
    """The output folders of the runs: "one" in this process, "two" and "nan" in one launch."""
    tmp = tmp_path_factory.mktemp("runs")
    recipe = write_recipe(tmp / "r.toml", base_tables(tiny_model_dir, small_data, tmp / "one"))
    # 1 rank x micro 8 x accumulation 1: the reference split
    proc = main_in_process(recipe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    sweep = tmp / "sweep"
    two = ["training.micro_batch_size=2"]
    runs = {
        # 2 ranks x micro 2 x accumulation 2, separate forward
        "two": [*two, "training.forward_mode=separate"],
        # step 2's loss poisoned on rank 1 (test_nan_step_is_skipped_on_every_rank)
        "nan": {"overrides": [*two, "training.max_steps=4", "export.enabled=false"], "env": NAN},
    }
    run_sweep(recipe, sweep, runs, nproc=2)
    return {"one": tmp / "one", "two": sweep / "two", "nan": sweep / "nan"}


@pytest.fixture(scope="module")
def runs(launched: dict[str, Path]) -> dict[str, Path]:
    """The two batch splits of one recipe."""
    return {name: launched[name] for name in ("one", "two")}


def test_step0_loss_is_ln2(runs: dict[str, Path]) -> None:
    for out in runs.values():
        rows = read_metrics(out)
        assert rows[0]["step"] == 0 and abs(rows[0]["eval/loss"] - LN2) < 1e-6
        assert abs(train_rows(out)[0]["loss"] - LN2) < 1e-6


def test_batch_split_invariance_losses_and_weights(runs: dict[str, Path]) -> None:
    one, two = train_rows(runs["one"]), train_rows(runs["two"])
    assert [r["step"] for r in one] == [1, 2, 3, 4] == [r["step"] for r in two]
    losses_one = [r["loss"] for r in one]
    assert losses_one[-1] < losses_one[0] - 1e-3, "the run must actually learn for this test to mean anything"
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a[key], b[key])
    w1, w2 = load_final_weights(runs["one"]), load_final_weights(runs["two"])
    assert w1.keys() == w2.keys() and len(w1) > 0
    for name in w1:
        assert torch.allclose(w1[name], w2[name], rtol=0, atol=1e-5), name


def test_metrics_rows_carry_the_contract_keys(runs: dict[str, Path]) -> None:
    keys = {
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "tokens_per_s",
        "mfu",
        "peak_mem_gib",
    }
    for row in train_rows(runs["two"]):
        assert keys <= row.keys()
        assert all(math.isfinite(row[k]) for k in keys)
    evals = [r for r in read_metrics(runs["two"]) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert {"eval/rewards/accuracies", "eval/logps/chosen"} <= evals[0].keys()


def test_resolved_recipe_and_export(runs: dict[str, Path], tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.recipe import load_config

    out = runs["two"]
    cfg = load_config(out / "recipe.toml")
    assert cfg.training.micro_batch_size == 2 and cfg.training.forward_mode == "separate"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tokenizer("sort: 3 1 2")["input_ids"]])
    assert not torch.allclose(model(ids).logits, initial(ids).logits), "final/ must hold trained weights"


def test_nan_step_is_skipped_on_every_rank(launched: dict[str, Path]) -> None:
    out = launched["nan"]
    rows = train_rows(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert math.isnan(rows[1]["grad_norm"]) and math.isnan(rows[1]["loss"])
    reference = train_rows(launched["one"])
    # step 1 is untouched; the skipped step left the weights as they were, so step 3 sees the
    # step-2 weights of the clean run (same data order, one update fewer)
    assert math.isclose(rows[0]["loss"], reference[0]["loss"], rel_tol=1e-5)
    assert math.isfinite(rows[3]["loss"])
    assert "update skipped" in sweep_stdout(out.parent)["nan"]
