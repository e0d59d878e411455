"""LoRA (peft) under FSDP2: split invariance, frozen base, reference = base model, resume, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.data import collate
from engine.forward import SequenceLogprobs, policy_logps
from engine.recipe import load_config
from engine.trainer import Trainer
from tests.conftest import (
    LN2,
    base_tables,
    every_position_logps,
    load_final_weights,
    main_in_process,
    run_sweep,
    run_training,
    train_rows,
    write_recipe,
)

LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "optimizer.lr=5e-3"]


def _recipe(tmp_path: Path, model_dir: Path, data: dict, out: Path) -> Path:
    tables = base_tables(model_dir, data, out)
    tables["training"]["micro_batch_size"] = 2
    return write_recipe(tmp_path / f"{out.name}.toml", tables)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict, world
) -> Trainer:
    tmp = tmp_path_factory.mktemp("lora")
    recipe = _recipe(tmp, tiny_model_dir, small_data, tmp / "run")
    trainer = Trainer(load_config(recipe, [*LORA, "export.lora=both"]), world)
    trainer.train()
    return trainer


def _every_position_logps(model: torch.nn.Module, trainer: Trainer) -> torch.Tensor:
    pair = trainer.train_data.pairs[0]
    return every_position_logps(model, torch.tensor([pair.prompt_ids + pair.chosen_ids]))


def test_step0_is_ln2_and_base_weights_stay_frozen(trained: Trainer, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    rows = train_rows(trained.output_dir)
    assert abs(rows[0]["loss"] - LN2) < 1e-6 and rows[-1]["loss"] != rows[0]["loss"]
    assert trained.trainable_params < trained.num_params / 5
    initial = load_file(tiny_model_dir / "model.safetensors")
    from engine.export import full_hf_state_dict

    state = full_hf_state_dict(trained.model)
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in state.items()
        if "lora_" not in k
    }
    assert base.keys() == initial.keys()
    for name, value in initial.items():
        assert torch.equal(base[name], value), name  # exact: frozen means untouched
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # the adapters did train (B starts at 0)


def test_reference_is_the_base_model(trained: Trainer, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    batch = collate(trained.train_data, list(range(16)))
    with torch.no_grad():
        expected = policy_logps("concatenated", base, batch, trained.pad_id, torch.device("cpu"))
    ref_c, ref_r = trained.train_reference.lookup(batch.pair_ids, torch.device("cpu"))
    torch.testing.assert_close(ref_c, expected.chosen_logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref_r, expected.rejected_logps, rtol=1e-6, atol=1e-6)


def test_exported_adapter_and_merged_model_reproduce_the_trained_model(
    trained: Trainer, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    expected = _every_position_logps(trained.model, trained)
    final = trained.output_dir / "final"
    merged = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32))
    torch.testing.assert_close(_every_position_logps(merged, trained), expected, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter = SequenceLogprobs(PeftModel.from_pretrained(base, final / "adapter"))
    torch.testing.assert_close(_every_position_logps(adapter, trained), expected, rtol=1e-5, atol=1e-5)
    untrained = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    assert not torch.allclose(_every_position_logps(untrained, trained), expected, atol=1e-4)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    overrides = [*LORA, "checkpoint.interval_steps=2"]
    one = tmp_path / "one"
    proc = main_in_process(_recipe(tmp_path, tiny_model_dir, small_data, one), overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stop at step 3 (a launch of its own: the kill ends it), then, in one two-rank launch, the
    # uninterrupted run and the resumed one
    sweep = tmp_path / "sweep"
    two, resumed = sweep / "two", sweep / "resumed"
    recipe = _recipe(tmp_path, tiny_model_dir, small_data, resumed)
    kill = {"FSDPO_FAULT_KILL": f"3:0:{tmp_path / 'k'}"}
    killed = run_training(recipe, overrides, nproc=2, env=kill, forked=True)
    assert killed.returncode != 0, killed.stderr[-3000:]
    run_sweep(recipe, sweep, {"two": overrides, "resumed": overrides}, nproc=2)
    for a, b in zip(train_rows(one), train_rows(two)):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (a, b)
    # a checkpoint holds adapters and optimizer state only (the frozen base comes from model.path)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(two / "checkpoints" / "step-4")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)
    # the resumed run: bitwise the uninterrupted run
    wa, wb = load_final_weights(two), load_final_weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
