"""No host-device synchronisation inside a training step but the documented one (engine/step.py).

On the CPU nothing waits, so the calls that would wait on a GPU are counted instead
(`engine.syncs.ReadCounter`) over whole optimizer steps (`Trainer.train_step`), in every forward
mode. Each read is named by its file and function, and each is either the step's one decision,
a read of a host tensor (no device involved), or transformers' mask preparation (documented,
not ours); any other read fails the test.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import Config
from engine.data import collate
from engine.forward import FORWARD_MODES
from engine.losses import LossOutput, PreferenceLogps
from engine.metrics import PairMetrics
from engine.recipe import load_config
from engine.reference_cache import ReferenceLogps
from engine.step import TrainStep
from engine.syncs import ReadCounter
from tests.conftest import base_tables, write_recipe

# the step's one wait: the all-reduced [non-finite, stop] flags, read once per optimizer step
STEP_DECISION = {("tolist", "engine/step.py:__call__"): 1}
# reads of host tensors, no device involved: the sampler's permutation (once per step) and the
# pairs' validity flags (`PairBatch.real_tokens`, once per micro-batch)
HOST_PER_STEP = {("tolist", "engine/data/sampler.py:micro_batches"): 1}
HOST_PER_MICRO_BATCH = {("tolist", "engine/data/sampler.py:real_tokens"): 1}
# batch-coupled losses: whether each micro-batch's pairs are all valid (host tensors)
COUPLED_HOST_PER_MICRO_BATCH = {("__bool__", "engine/step.py:<genexpr>"): 1}
# transformers' mask preparation, per forward: with an attention mask (padded modes) whether the
# mask can be skipped for sdpa (one read, two with padding); with position ids and no mask
# (packed modes) whether the row packs several sequences (one read)
TRANSFORMERS_PADDED = ("__bool__", "transformers/masking_utils.py:_ignore_causal_mask_sdpa")
TRANSFORMERS_PACKED = ("__bool__", "transformers/masking_utils.py:find_packed_sequence_indices")
FORWARDS_PER_MICRO_BATCH = {"concatenated": 1, "separate": 2, "packed": 1, "prefix_shared": 1}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict, world):
    from engine.trainer import Trainer

    tmp = tmp_path_factory.mktemp("syncs")
    tables = base_tables(tiny_model_dir, small_data, tmp / "run")
    tables["data"]["train"] = [{"path": str(small_data["train"]), "count": 16}]
    tables["data"]["eval"] = []
    tables["training"].update(global_batch_size=4, micro_batch_size=2, max_steps=8)
    tables["export"] = {"enabled": False}
    return Trainer(load_config(write_recipe(tmp / "r.toml", tables)), world)


def _ld(trainer, ld_alpha: float) -> tuple[Config, ReferenceLogps]:
    """The trainer's recipe with `loss.ld_alpha` and its reference table, with stand-in
    shared-length sums (the totals) when LD-DPO is on: the counts do not depend on the values."""
    cfg = replace(trainer.cfg, loss=replace(trainer.cfg.loss, ld_alpha=ld_alpha))
    ref = trainer.train_reference
    return cfg, ref if ld_alpha == 1.0 else ReferenceLogps(ref.chosen, ref.rejected, ref.chosen, ref.rejected)


@pytest.mark.parametrize("ld_alpha", [1.0, 0.5])
@pytest.mark.parametrize("mode", list(FORWARD_MODES))
def test_a_training_step_waits_for_the_device_once(trainer, mode: str, ld_alpha: float, monkeypatch) -> None:
    """One step of two micro-batches, after one that created the optimizer state (the modes
    share the trainer: its model, optimizer and reference table), with LD-DPO off and on."""
    cfg, reference = _ld(trainer, ld_alpha)
    step = TrainStep(
        trainer.model, trainer.optimizer, trainer.scheduler, cfg, trainer.world.device,
        trainer.pad_id, reference, mode,
    )  # fmt: skip
    monkeypatch.setattr(trainer, "step", step)
    window = PairMetrics()
    if not trainer.optimizer.state:
        trainer.train_step(0, window)
    index = list(FORWARD_MODES).index(mode) + (1 if ld_alpha == 1.0 else 4)
    counter = ReadCounter()
    with counter:
        _, grad_norm, skipped, stop = trainer.train_step(index, window)
    assert not skipped and stop == 0 and torch.isfinite(grad_norm)
    micro_batches = len(trainer.sampler.micro_batches(index))
    assert micro_batches == 2
    forwards = micro_batches * FORWARDS_PER_MICRO_BATCH[mode]
    reads = dict(counter.reads)
    if mode in ("packed", "prefix_shared"):
        assert reads.pop(TRANSFORMERS_PACKED) == forwards, reads
    else:
        assert forwards <= reads.pop(TRANSFORMERS_PADDED) <= 2 * forwards, reads
    expected = {**STEP_DECISION, **HOST_PER_STEP}
    expected.update({k: n * micro_batches for k, n in HOST_PER_MICRO_BATCH.items()})
    assert reads == expected, f"{mode}: reads beyond the documented ones: {reads}"
    # AdamW reads its step counters: host tensors (unless capturable or fused)
    counters = {id(s["step"]) for s in trainer.optimizer.state.values()}
    assert counter.optimizer_steps and all(t.device.type == "cpu" for t in counter.optimizer_steps)
    assert {id(t) for t in counter.optimizer_steps} <= counters


@pytest.mark.parametrize("loss", ["aot_unpaired", "bco", "beta_dpo"])
def test_batch_coupled_losses_add_a_forward_and_no_device_read(trainer, loss: str, monkeypatch) -> None:
    """The pre-pass (`TrainStep.batch_contexts`): one more forward per micro-batch (transformers'
    own reads double), the pairs' validity checked on the host, nothing read from the device
    (beta-DPO's RNG draw count is a host tensor)."""
    cfg = replace(trainer.cfg, loss=replace(trainer.cfg.loss, type=loss))
    step = TrainStep(
        trainer.model, trainer.optimizer, trainer.scheduler, cfg, trainer.world.device,
        trainer.pad_id, trainer.train_reference, "concatenated",
    )  # fmt: skip
    monkeypatch.setattr(trainer, "step", step)
    window = PairMetrics()
    if not trainer.optimizer.state:
        trainer.train_step(0, window)
    counter = ReadCounter()
    with counter:
        _, grad_norm, skipped, _ = trainer.train_step(7, window)
    assert not skipped and torch.isfinite(grad_norm)
    micro_batches = len(trainer.sampler.micro_batches(7))
    reads = dict(counter.reads)
    assert 2 * micro_batches <= reads.pop(TRANSFORMERS_PADDED) <= 4 * micro_batches, reads
    expected = {**STEP_DECISION, **HOST_PER_STEP}
    expected.update(
        {k: n * micro_batches for k, n in (HOST_PER_MICRO_BATCH | COUPLED_HOST_PER_MICRO_BATCH).items()}
    )
    assert reads == expected, f"{loss}: reads beyond the documented ones: {reads}"


def _loss_output(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> LossOutput:
    return LossOutput(losses, chosen, rejected, {"extra/x": losses * 2})


def test_pair_metrics_accumulate_without_reads_and_reduce_with_one() -> None:
    """Two micro-batches, the second with a padding pair: the means are those of the valid pairs,
    computed here in float64 from the values; adding reads nothing, reducing reads once."""
    g = torch.Generator().manual_seed(0)
    parts = []
    for b, valid in ((3, [True, True, True]), (2, [True, False])):
        values = torch.randn(5, b, generator=g, dtype=torch.float64)
        parts.append((values, torch.tensor(valid)))
    window, counter = PairMetrics(), ReadCounter()
    with counter:
        for values, valid in parts:
            losses, chosen, rejected, lc, lr = (v.float() for v in values)
            logps = PreferenceLogps(lc, lr, torch.ones_like(lc), torch.ones_like(lr))
            window.add(losses, _loss_output(losses, chosen, rejected), logps, valid)
        window.tokens += 7
    assert not counter.reads
    with counter:
        reduced = window.reduce(torch.device("cpu"), {"tokens": float(window.tokens)})
    assert counter.reads == {("tolist", "engine/metrics.py:reduce"): 1}
    kept = torch.cat([values[:, valid] for values, valid in parts], dim=1).float().double()
    losses, chosen, rejected, lc, lr = kept
    expected = {
        "loss": losses.mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).double().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": lc.mean(),
        "logps/rejected": lr.mean(),
        "extra/x": (2 * losses).mean(),
    }
    assert reduced.pop("pairs") == 4 and reduced.pop("tokens") == 7
    assert list(reduced) == sorted(expected)
    for name, value in expected.items():
        assert reduced[name] == pytest.approx(float(value), rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("mode", list(FORWARD_MODES))
def test_micro_batch_inputs_carry_host_side_counts(trainer, mode: str) -> None:
    """`TrainStep.prepare`'s inputs: real tokens, each sequence's scored-token count (its
    completion's length) and with LD-DPO its tokens within the pair's shared length come from the
    host layout, not from the device."""
    step = TrainStep(None, None, None, _ld(trainer, 0.5)[0], torch.device("cpu"), trainer.pad_id, mode=mode)
    batch = collate(trainer.train_data, [0, 1, 2], [True, True, False])
    micro = step.prepare(batch)
    assert micro.real_tokens == sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(batch.prompts[:2], batch.chosen[:2], batch.rejected[:2])
    )
    counts = torch.cat([inputs.sequence_tokens for inputs in micro.inputs])
    assert counts.tolist() == [len(c) for c in batch.chosen] + [len(r) for r in batch.rejected]
    shared = torch.zeros(len(counts), dtype=torch.long)
    offset = 0
    for inputs in micro.inputs:
        shared.index_add_(0, inputs.score_sequences + offset, inputs.score_in_shared.long())
        offset += inputs.num_sequences
    assert shared.tolist() == 2 * [min(len(c), len(r)) for c, r in zip(batch.chosen, batch.rejected)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA copies need a GPU")
@pytest.mark.parametrize("mode", list(FORWARD_MODES))
def test_micro_batch_inputs_reach_cuda_without_the_host_waiting(trainer, mode: str) -> None:
    """On a GPU, preparing a micro-batch makes no synchronising copy (sync debug mode "error"
    raises on one) and every input lands on the device (LD-DPO's flags included)."""
    cuda = torch.device("cuda")
    step = TrainStep(None, None, None, _ld(trainer, 0.5)[0], cuda, trainer.pad_id, mode=mode)
    batch = collate(trainer.train_data, [0, 1, 2], [True, True, False])
    torch.cuda.set_sync_debug_mode("error")
    try:
        micro = step.prepare(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tensors = [micro.valid, micro.pair_ids]
    for inputs in micro.inputs:
        tensors += [v for v in vars(inputs).values() if isinstance(v, torch.Tensor)]
    assert all(t.device.type == "cuda" for t in tensors)
