"""The trainer's components on their own, in-process: the checkpoint manager's timing and the
state it saves and restores, the throughput meter's row, the reference provider's load and
compute paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from engine import metrics, reference
from engine.checkpoint import CheckpointManager, TrainerState
from engine.config import CheckpointConfig, SchedulerConfig
from engine.data import collate
from engine.errors import UserError
from engine.forward import Work, forward_work, policy_logps
from engine.metrics import PairMetrics, ThroughputMeter, model_flops, peak_memory_gib
from engine.recipe import load_config
from engine.run_dir import RunDir
from engine.step import build_model
from engine.trainer import build_data
from tests.conftest import base_tables, write_recipe


def _manager(tmp_path: Path, world, cfg: CheckpointConfig, steps_per_epoch: int = 4, total: int = 10):
    """A manager over a fresh Linear, its AdamW and a linear schedule of `total` steps."""
    from engine.optim import build_scheduler

    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, total, SchedulerConfig(type="linear", warmup_steps=2))
    run_dir = RunDir(tmp_path / "run")
    manager = CheckpointManager(run_dir, cfg, world, model, optimizer, scheduler, steps_per_epoch, "a = 1\n")
    return manager, model, optimizer, scheduler


@pytest.mark.parametrize(
    ("every", "epochs", "expected"),
    [
        (3, 0, {s for s in range(1, 25) if s % 3 == 0}),
        (0, 2, {8, 16, 24}),  # 4 steps an epoch: the end of every second epoch
        (3, 2, {s for s in range(1, 25) if s % 3 == 0} | {8, 16, 24}),
        (0, 0, set()),
    ],
)
def test_a_checkpoint_is_due_at_the_step_and_epoch_intervals(
    tmp_path: Path, world, every: int, epochs: int, expected: set[int]
) -> None:
    cfg = CheckpointConfig(interval_steps=every, interval_epochs=epochs)
    manager = _manager(tmp_path, world, cfg)[0]
    assert {s for s in range(0, 25) if manager.due(s)} == expected


def test_the_manager_saves_and_restores_the_scheduler_and_checks_the_run(
    tmp_path: Path, world, capsys: pytest.CaptureFixture
) -> None:
    from engine.optim import build_scheduler

    manager, model, optimizer, scheduler = _manager(tmp_path, world, CheckpointConfig(interval_steps=3))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    manager.save(
        3, TrainerState(step=3, consumed_pairs=12, global_batch_size=4, world_size=1, total_steps=10)
    )
    path = tmp_path / "run" / "checkpoints" / "step-3"
    saved = json.loads((path / "trainer_state.json").read_text())
    assert saved["scheduler"] == json.loads(json.dumps(scheduler.state_dict()))
    assert (path / "recipe.toml").read_text() == "a = 1\n"

    fresh = TrainerState(global_batch_size=4, world_size=1, total_steps=10)
    other, model2, _, scheduler2 = _manager(tmp_path / "b", world, CheckpointConfig())
    state = other.resume(path, fresh)
    assert (state.step, state.consumed_pairs, state.total_steps) == (3, 12, 10)
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    assert scheduler2.last_epoch == 3 and scheduler2.get_last_lr() == scheduler.get_last_lr()

    with pytest.raises(UserError) as error:
        _manager(tmp_path / "c", world, CheckpointConfig())[0].resume(path, TrainerState(global_batch_size=8))
    assert str(error.value) == (
        f"training.global_batch_size: the checkpoint {path} was trained with 4 pairs per step, "
        "this run asks for 8"
    )

    # a schedule of another length: the new one's learning rate from the next step on
    longer, _, _, scheduler4 = _manager(tmp_path / "d", world, CheckpointConfig(), total=20)
    capsys.readouterr()
    longer.resume(path, TrainerState(global_batch_size=4, world_size=1, total_steps=20))
    expected = build_scheduler(
        torch.optim.AdamW(nn.Linear(1, 1).parameters(), lr=0.1),
        20,
        SchedulerConfig(type="linear", warmup_steps=2),
    )
    for _ in range(3):
        expected.optimizer.step()
        expected.step()
    assert math.isclose(scheduler4.get_last_lr()[0], expected.get_last_lr()[0], rel_tol=1e-12)
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: resuming")]
    assert warning == [
        f"warning: resuming {path}: its schedule was planned for 10 steps, this run has 20 (training.max_steps, "
        f"epochs or the data changed); the learning rate follows the new schedule from step 4: "
        f"{expected.get_last_lr()[0]:.4g} instead of {scheduler.get_last_lr()[0]:.4g}"
    ]


def test_the_meter_row_counts_the_window_and_leaves_the_pauses_out(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, dtype, size=2048: 2e9)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    with torch.device("meta"):
        causal_lm = LlamaForCausalLM(config)
    meter = ThroughputMeter("concatenated", causal_lm, torch.device("cpu"), torch.float32, ranks=2)
    micro_batches = [[(2, 3, 4), (1, 1, 1)], [(3, 2, 2)]]
    for lengths in micro_batches:
        meter.add(lengths)
    clock[0] += 1.0
    with meter.paused():  # an evaluation of 2 s
        clock[0] += 2.0
    clock[0] += 2.0
    window = PairMetrics()
    window.tokens = 1234
    means, row = meter.reduce(window)

    seconds = 3.0  # 5 s, of which 2 paused
    positions = 2 * 2 * 6 + 2 * 1 * 5  # 2B rows as wide as the longest sequence, per micro-batch
    work = Work()
    for lengths in micro_batches:
        work += forward_work("concatenated", lengths)
    assert work.positions == positions
    assert means == {}
    assert row["tokens_per_s"] == 1234 / seconds
    assert row["positions_per_s"] == positions / seconds
    assert math.isclose(row["mfu"], model_flops(meter.shape, work) / seconds / (2e9 * 2), rel_tol=1e-12)
    assert 0 < row["peak_mem_gib"] <= peak_memory_gib(torch.device("cpu"))
    clock[0] += 1.0  # the next window starts empty
    assert meter.reduce(PairMetrics())[1]["positions_per_s"] == 0.0


def test_the_provider_computes_once_then_loads_the_same_numbers(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "run")
    tables["data"]["train"] = [{"path": str(small_data["train"]), "count": 6}]
    recipe = write_recipe(tmp_path / "r.toml", tables)
    cfg = load_config(recipe, [f"reference.cache_dir={tmp_path / 'cache'}"])
    tokenizer, train_data, _ = build_data(cfg)
    model, _ = build_model(cfg, world)

    computed = reference.ReferenceProvider(cfg, model, tokenizer, world, torch.float32)
    first = computed.get(train_data, "train", cfg.data.train)
    assert computed.forwards == 1 and len(list((tmp_path / "cache").glob("reference-*.safetensors"))) == 1
    with torch.no_grad():
        for i in range(len(train_data)):
            logps = policy_logps(
                "concatenated", model, collate(train_data, [i]), tokenizer.pad_token_id, world.device
            )
            torch.testing.assert_close(first.chosen[i : i + 1], logps.chosen_logps, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(first.rejected[i : i + 1], logps.rejected_logps, rtol=1e-5, atol=1e-5)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached data set is not computed again")

    monkeypatch.setattr(reference, "compute_reference_logps", forbidden)
    loaded = reference.ReferenceProvider(cfg, model, tokenizer, world, torch.float32)
    second = loaded.get(train_data, "train", cfg.data.train)
    assert loaded.forwards == 0
    assert torch.equal(second.chosen, first.chosen) and torch.equal(second.rejected, first.rejected)
    assert loaded.get(None, "eval", cfg.data.eval) is None
    simpo = load_config(recipe, [f"reference.cache_dir={tmp_path / 'cache'}", "loss.type=simpo"])
    assert (
        reference.ReferenceProvider(simpo, model, tokenizer, world, torch.float32).get(
            train_data, "train", cfg.data.train
        )
        is None
    )

    (tmp_path / "a-file").write_text("")
    not_a_folder = load_config(recipe, [f"reference.cache_dir={tmp_path / 'a-file'}"])
    with pytest.raises(UserError) as error:
        reference.ReferenceProvider(not_a_folder, model, tokenizer, world, torch.float32)
    assert str(error.value) == f"reference.cache_dir: {tmp_path / 'a-file'} is not a folder"
