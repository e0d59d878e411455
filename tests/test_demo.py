"""The shipped demo recipe end to end, and export fidelity against the trained (sharded) model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import (
    LN2,
    REPO,
    base_tables,
    every_position_logps,
    read_metrics,
    run_training,
    train_rows,
    write_recipe,
)

pytestmark = pytest.mark.slow


def test_demo_recipe_runs_under_torchrun_with_two_ranks(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    proc = run_training(
        REPO / "recipes" / "demo.toml",
        [
            f"job.output_dir={out}",
            'data.train=[{path = "recipes/assets/demo_train.jsonl", count = 256}]',
            'data.eval=[{path = "recipes/assets/demo_eval.jsonl", count = 32}]',
            "training.max_steps=6",
            "training.eval_interval_steps=3",
            "logging.interval_steps=2",
        ],
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out preference accuracy" in proc.stdout and "-> after" in proc.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 3, 6]
    assert [r["step"] for r in train_rows(out)] == [2, 4, 6]
    assert abs(rows[0]["eval/loss"] - LN2) < 1e-6
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sort: 3 1 2"}], add_generation_prompt=True
    )
    assert torch.isfinite(model(torch.tensor([ids["input_ids"]])).logits).all()


def test_export_reproduces_the_trained_model_logits(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """Every position's next-token log-probs from the trained FSDP model equal final/'s (1e-6)."""
    from transformers import AutoModelForCausalLM

    from engine.recipe import load_config
    from engine.trainer import Trainer

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    trainer = Trainer(load_config(recipe, ["training.max_steps=3"]), world)
    trainer.train()
    ids = torch.tensor([trainer.train_data.pairs[0].prompt_ids + trainer.train_data.pairs[0].chosen_ids])
    # score every position as its own one-token sequence: log p(x_{t+1} | x_<=t) for all t
    trained = every_position_logps(trainer.model, ids)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
        logits = reloaded(ids, use_cache=False).logits[0, :-1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(trained, expected, rtol=1e-6, atol=1e-6)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(initial(ids).logits, reloaded(ids).logits)
