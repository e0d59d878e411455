"""What a run says about itself: start-up warnings (a warmup as long as the run, pairs no global
batch takes), a resume whose total steps changed, an honest CPU matmul peak for MFU, why wandb
logs offline, and the generation config an export writes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from engine import metrics
from engine.config import LoggingConfig
from engine.data import GlobalBatchSampler
from engine.model import save_tokenizer_and_generation_config
from engine.recipe import load_config
from engine.trainer import Trainer, startup_warnings
from tests.conftest import ASSETS, base_tables, train_rows, write_recipe


def _cfg(tmp_path: Path, overrides: list[str]):
    tables = base_tables(Path(ASSETS / "tiny-llama"), {"train": "t.jsonl", "eval": "e.jsonl"}, tmp_path)
    return load_config(write_recipe(tmp_path / "r.toml", tables), overrides)


def test_startup_warnings_name_a_warmup_as_long_as_the_run_and_the_pairs_left_out(tmp_path: Path) -> None:
    whole = GlobalBatchSampler(64, 16, 8, 0, 1, seed=0)  # 4 batches, nothing left out
    cfg = _cfg(tmp_path, ["scheduler.warmup_steps=4", "optimizer.lr=1e-3"])
    # 4 warmup steps of 4: the lr at the last step (index 3) is (3 + 1) / (4 + 1) of optimizer.lr
    assert startup_warnings(cfg, 4, whole) == [
        "warning: scheduler.warmup_steps=4 is not below the 4 training steps: the learning rate only "
        "warms up, to 0.0008 at the last step, and never reaches optimizer.lr=0.001"
    ]
    assert startup_warnings(_cfg(tmp_path, ["scheduler.warmup_steps=3"]), 4, whole) == []
    ratio = startup_warnings(
        _cfg(tmp_path, ["scheduler.warmup_steps=0", "scheduler.warmup_ratio=0.9"]), 3, whole
    )
    assert (
        len(ratio) == 1
        and "scheduler.warmup_ratio=0.9 (3 steps) is not below the 3 training steps" in ratio[0]
    )
    # 64 pairs in global batches of 24: 2 batches, 64 - 48 = 16 pairs wait for another epoch
    partial = GlobalBatchSampler(64, 24, 8, 0, 1, seed=0)
    assert partial.unused_per_epoch == 16
    assert startup_warnings(_cfg(tmp_path, []), 2, partial) == [
        "data: 16 of the 64 training pairs are left out of each epoch (2 whole global batches of "
        "training.global_batch_size=24; a different random set each epoch)"
    ]


def test_resume_with_more_steps_warns_and_follows_the_new_schedule(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, capsys: pytest.CaptureFixture
) -> None:
    """2 steps, then resumed with max_steps=4. Linear decay after 1 warmup step:
    planned for 2 steps, step index 2 has lr 0 (the decay is over); planned for 4, it has
    1e-3 x (1 - (2 - 1) / (4 - 1)) = 6.667e-4, and index 3 has 1e-3 x (1 - 2/3) = 3.333e-4."""
    out = tmp_path / "run"
    tables = base_tables(tiny_model_dir, small_data, out)
    tables["data"]["eval"] = []
    tables["training"].update(global_batch_size=24, micro_batch_size=8, max_steps=2)
    tables["checkpoint"] = {"interval_steps": 2}
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    Trainer(load_config(recipe), world).train()
    first = capsys.readouterr().out
    assert "data: 16 of the 64 training pairs are left out of each epoch" in first
    assert json.loads((out / "data_stats.json").read_text())["batches"] == {
        "global_batch_size": 24,
        "steps_per_epoch": 2,
        "unused_pairs_per_epoch": 16,
    }
    startup = next(line for line in first.splitlines() if "MFU peak" in line)
    assert "GFLOP/s per rank (measured matmul, float32)" in startup, startup
    assert all(0 < row["mfu"] <= 1 for row in train_rows(out))

    Trainer(load_config(recipe, ["training.max_steps=4"]), world).train()
    resumed = capsys.readouterr().out
    warning = next(line for line in resumed.splitlines() if line.startswith("warning: resuming"))
    assert (
        "planned for 2 steps, this run has 4" in warning and "from step 3: 0.0006667 instead of 0" in warning
    )
    lrs = {row["step"]: row["lr"] for row in train_rows(out)}
    assert math.isclose(lrs[3], 1e-3 * 2 / 3) and math.isclose(lrs[4], 1e-3 / 3), lrs
    assert json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())["total_steps"] == 4


def test_cpu_matmul_peak_is_the_faster_of_the_compute_dtype_and_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    measured = []

    def fake(rates):
        def measure(device, dtype, size=2048):
            measured.append((device.type, dtype))
            return rates[dtype]

        return measure

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(metrics, "measure_matmul_flops", fake({torch.bfloat16: 1e9, torch.float32: 4e9}))
    # a bf16 model that reaches the fp32 rate: MFU 4 against the bf16 peak, 1 against this one
    assert metrics.matmul_peak(cpu, torch.bfloat16) == (4e9, "float32, faster than bfloat16 on this CPU")
    assert metrics.matmul_peak(cuda, torch.bfloat16) == (1e9, "bfloat16")  # a GPU: its bf16 rate
    monkeypatch.setattr(metrics, "measure_matmul_flops", fake({torch.bfloat16: 8e9, torch.float32: 4e9}))
    assert metrics.matmul_peak(cpu, torch.bfloat16) == (8e9, "bfloat16")
    measured.clear()
    assert metrics.matmul_peak(cpu, torch.float32) == (4e9, "float32") and len(measured) == 1


def test_wandb_says_why_it_logs_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    auto = LoggingConfig(wandb=True)
    assert metrics.wandb_mode(auto) == ("offline", "no API key found")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics.wandb_mode(auto) == ("online", "an API key is configured")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment's choice wins over the key
    assert metrics.wandb_mode(auto) == ("offline", "WANDB_MODE=offline")
    assert metrics.wandb_mode(LoggingConfig(wandb=True, mode="offline")) == (
        "offline",
        'logging.mode = "offline"',
    )


def test_exported_generation_config_stops_at_the_trained_eos(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The demo model: eos <|im_end|> (2), pad and bos <|endoftext|> (0)."""
    shipped = json.loads((ASSETS / "tiny-llama" / "generation_config.json").read_text())
    eos = shipped["eos_token_id"] if isinstance(shipped["eos_token_id"], list) else [shipped["eos_token_id"]]
    assert eos == [2] and shipped["pad_token_id"] not in eos and shipped["bos_token_id"] not in eos

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    GenerationConfig(bos_token_id=0, eos_token_id=[2, 0], pad_token_id=0).save_pretrained(
        base
    )  # the old asset
    tokenizer = AutoTokenizer.from_pretrained(base)
    save_tokenizer_and_generation_config(tokenizer, str(base), tmp_path / "a")
    assert GenerationConfig.from_pretrained(tmp_path / "a").eos_token_id == 2
    # trained with another EOS (here <|im_start|>, 1): it comes first, the model's own after it
    tokenizer.eos_token = "<|im_start|>"
    save_tokenizer_and_generation_config(tokenizer, str(base), tmp_path / "b")
    assert GenerationConfig.from_pretrained(tmp_path / "b").eos_token_id == [1, 2]
    # no generation config in the base model: one is written, from the model config's ids
    (base / "generation_config.json").unlink()
    save_tokenizer_and_generation_config(AutoTokenizer.from_pretrained(base), str(base), tmp_path / "c")
    written = GenerationConfig.from_pretrained(tmp_path / "c")
    assert (written.eos_token_id, written.pad_token_id, written.bos_token_id) == (2, 0, 0)
