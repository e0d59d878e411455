"""Streaming export: sharded safetensors with an index, dtype choice, and fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import parse_size
from engine.recipe import load_config
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


def test_relative_paths_are_stored_absolute_so_exports_work_from_another_directory(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe's paths are relative to the working directory; the recipe fsdpo stores (in the run
    and its checkpoints) and the adapter's base model are absolute, so `python -m engine.export`
    and `AutoPeftModelForCausalLM` work from anywhere."""
    import os

    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from engine.export import main as export_main

    work, elsewhere = tmp_path.resolve() / "work", tmp_path.resolve() / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    model = tiny_model_dir.resolve()
    data = {k: Path(os.path.relpath(v.resolve(), work)) for k, v in small_data.items()}
    tables = base_tables(Path(os.path.relpath(model, work)), data, Path("run"))
    tables["checkpoint"] = {"interval_steps": 1}
    recipe = write_recipe(work / "r.toml", tables)
    monkeypatch.chdir(work)
    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "export.lora=both"]
    cfg = load_config(recipe, ["training.max_steps=1", *lora])
    assert cfg.model.path == str(model) and cfg.job.output_dir == str(work / "run")
    Trainer(cfg, world).train()

    run = work / "run"
    monkeypatch.chdir(elsewhere)
    assert load_config(run / "recipe.toml") == cfg
    adapter = run / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model)
    AutoPeftModelForCausalLM.from_pretrained(adapter)  # finds its base model from here
    assert export_main([str(run / "checkpoints" / "step-1"), "exported"]) == 0
    exported = load_file(elsewhere / "exported" / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_demo_lora_adapter_loads_with_auto_peft_from_anywhere(tmp_path: Path, world, monkeypatch) -> None:
    """The demo LoRA run's base is a random init that exists nowhere else: the export writes it
    beside the adapter (final/adapter/base_model) and the adapter names it, so
    `AutoPeftModelForCausalLM` loads the adapter from any directory and reproduces final/'s
    merged model."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from engine.recipe import load_config
    from engine.trainer import Trainer
    from tests.conftest import REPO

    out = tmp_path / "demo_lora"
    monkeypatch.chdir(REPO)  # the demo recipe's paths are relative to the repository root
    overrides = [f"job.output_dir={out}", "training.max_steps=2", "data.eval=[]"]
    overrides += ['data.train=[{path = "recipes/assets/demo_train.jsonl", count = 32}]']
    Trainer(load_config(REPO / "recipes" / "demo_lora.toml", overrides), world).train()
    monkeypatch.chdir(tmp_path)
    adapter = out / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((adapter / "base_model").resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = torch.tensor([[5, 17, 42, 9, 3, 11]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(adapter / "base_model")
        assert not torch.allclose(base(ids).logits, merged(ids).logits)  # the adapters did train


def test_exported_config_keeps_the_models_dropout() -> None:
    from engine.model import restore_config_dropout

    exported = {"attention_dropout": 0.0, "hidden_act": "gelu", "text_config": {"resid_pdrop": 0.0}, "x": 1}
    source = {"attention_dropout": 0.1, "hidden_act": "relu", "text_config": {"resid_pdrop": 0.2}, "x": 2}
    restore_config_dropout(exported, source)
    assert exported == {
        "attention_dropout": 0.1,
        "hidden_act": "gelu",
        "text_config": {"resid_pdrop": 0.2},
        "x": 1,
    }
