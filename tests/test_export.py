"""Streaming export: sharded safetensors with an index, dtype choice, and fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.export import parse_size
from engine.trainer import Trainer
from tests.conftest import base_tables, every_position_logps, write_recipe


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("100KB") == 100_000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_sharded_export_reloads_with_the_trained_logits(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from engine.forward import SequenceLogprobs

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    trainer = Trainer(load_config(recipe, ["training.max_steps=2", "export.max_shard_size=150KB"]), world)
    trainer.train()
    final = out / "final"
    files = sorted(final.glob("model-*-of-*.safetensors"))
    assert len(files) >= 3 and all(f.stat().st_size <= 150_000 + 70_000 for f in files)
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    pair = trainer.train_data.pairs[0]
    ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
    expected = every_position_logps(trainer.model, ids)
    reloaded = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32))
    torch.testing.assert_close(every_position_logps(reloaded, ids), expected, rtol=1e-6, atol=1e-6)
    assert not (out / "final.incomplete").exists()

    Trainer(
        load_config(recipe, ["training.max_steps=1", "export.dtype=bfloat16", "job.overwrite=true"]), world
    ).train()
    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
