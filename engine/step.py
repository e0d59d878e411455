"""The training step and the model it steps: one of each, run by the trainer and by the bench.

`build_model` is the trained model as the trainer builds it: `build_policy`, wrapped in
`SequenceLogprobs`, sharded by `parallelize` over the recipe's mesh, a pretrained safetensors
folder created on the meta device and loaded shard by shard (no rank ever holds the whole model).

`build_live_reference` is the live reference (`reference.mode = "live"`, engine/reference.py
`LiveReference`): `build_model` once more, frozen, or with LoRA the policy itself (adapters off).

`TrainStep` is one optimizer step over a rank's micro-batches: forward and backward of each
(gradient reduction deferred to the last one under `parallel.gradient_sync`), the loss divided
by the global pair count (see engine/trainer.py), one finiteness decision for all ranks (a
non-finite loss anywhere skips the update), clipping, the optimizer and scheduler steps.

Host-device synchronisation. The host never waits for the device inside a step but once: the
all-reduce of the step's flags [non-finite loss on this rank, stop signal] and its read, which
decides whether every rank updates and whether every rank stops after this step. Otherwise the
host runs ahead and queues work (which FSDP2's implicit prefetch relies on):
- a micro-batch's inputs are built on the host while the previous one computes (`prepare`:
  the layout's tensors, each sequence's scored-token count, the pairs' validity and ids) and
  copied from pinned memory with `non_blocking=True` on CUDA (`engine.forward.to_device`);
- reference log-probs are a table on the device, indexed there;
- the non-finite test and the per-pair metrics accumulate on the device (`PairMetrics`,
  read once per log step); the gradient norm is returned as a tensor (read it when logging).
tests/test_syncs.py counts every value read in a step, per forward mode, against this list and
the model's own (transformers' mask preparation: see there).

Batch-coupled losses (`losses.batch_coupled`: AOT, BCO's running delta, beta-DPO, KTO's z0) are defined over
the step's global batch: before the passes above, `batch_contexts` runs a no-grad forward of
every micro-batch (one more forward per micro-batch, no backward), all-gathers the per-pair
log-probs across ranks, orders them by pair id (so the result does not depend on world size or
micro-batching); nothing is read from the device (each micro-batch's pairs are checked valid on
their host tensor). Other losses skip it. The pre-pass and the
gradient pass must compute the same log-probs: a model with dropout active would break that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from engine import losses
from engine.config import Config
from engine.data import PairBatch
from engine.distributed import World, stop_signal
from engine.forward import FORWARD_MODES, ModelInputs, SequenceLogprobs, score_pairs, to_device
from engine.loading import materialize_and_load
from engine.metrics import PairMetrics, peak_memory_gib
from engine.model import build_policy, sharded_weights_dir
from engine.parallel import build_mesh, defers_gradient_sync, local_state_bytes, parallelize
from engine.reference import LiveReference
from engine.reference_cache import ReferenceLogps
from engine.sequence_parallel import build_sequence_group


def build_model(
    cfg: Config, world: World, causal_lm: nn.Module | None = None
) -> tuple[nn.Module, DeviceMesh]:
    """(The sharded `SequenceLogprobs` model on `world.device`, its device mesh). `causal_lm`
    replaces the recipe's model (the bench's random-init `--model-config` variants)."""
    weights_dir = sharded_weights_dir(cfg.model) if causal_lm is None else None
    if causal_lm is None:
        causal_lm = build_policy(cfg.model, cfg.lora, cfg.job.seed, defer_weights=weights_dir is not None)
    t = cfg.training
    mesh = build_mesh(cfg.parallel, world.world_size, world.ranks_per_node, world.device.type)
    sequence = build_sequence_group(cfg.parallel.sequence_parallel, world.world_size)
    model = parallelize(
        SequenceLogprobs(causal_lm, t.logprob_chunk_tokens, t.attention_kernel, sequence),
        cfg.parallel,
        mesh,
        world.device,
    )
    if weights_dir is not None:
        rss_before = peak_memory_gib(torch.device("cpu"))
        materialize_and_load(model, weights_dir, world.device)
        print(
            f"[rank {world.rank}] loaded {weights_dir} shard by shard: peak RSS "
            f"{peak_memory_gib(torch.device('cpu')):.2f} GiB (before loading {rss_before:.2f} GiB)",
            flush=True,
        )
    return model, mesh


def build_live_reference(cfg: Config, world: World, policy: nn.Module) -> LiveReference | None:
    """The live reference of `policy` (`build_model`'s, before any update) when `reference.mode`
    is "live": a second `build_model` (the same initial weights, sharded the same way), frozen in
    eval mode; with LoRA the policy itself, its adapters disabled. None for a cached reference."""
    r = cfg.reference
    if r.mode != "live":
        return None
    token_kl = losses.needs_token_kl(cfg.loss)
    if cfg.lora.enabled:
        return LiveReference(policy, token_kl, adapters_off=True)
    model, _ = build_model(cfg, world)
    model.requires_grad_(False)
    model.eval()
    return LiveReference(model, token_kl, sync_steps=r.sync_steps, sync_alpha=r.sync_alpha)


@dataclass
class MicroBatch:
    """A micro-batch's inputs on the device (`TrainStep.prepare`), copied ahead of its forward."""

    inputs: list[ModelInputs]  # the forward mode's layout
    valid: Tensor  # [B] bool: False for padding pairs
    pair_ids: Tensor  # [B] long: rows of the reference table
    real_tokens: int  # of the valid pairs (`PairBatch.real_tokens`), counted on the host
    desirable: Tensor | None = None  # [B] float: unpaired examples' labels (`PairBatch.desirable`)


@dataclass
class StepResult:
    lr: float  # the learning rate the update used
    grad_norm: Tensor  # 0-d, before clipping (NaN when skipped); reading it waits for the step
    skipped: bool  # a non-finite loss on some rank: no update
    stop: int  # the stop signal some rank received (0: none), the same on every rank


class TrainStep:
    """One optimizer step of `model` (`build_model`) over a rank's micro-batches (`__call__`).

    `reference` (on the device: `ReferenceLogps.to`) holds the reference log-probs (and their
    shared-length sums for LD-DPO), looked up by pair id; None for reference-free losses and
    under `live` (`build_live_reference`), a reference model run on each micro-batch instead.
    `mode` overrides `training.forward_mode`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        cfg: Config,
        device: torch.device,
        pad_id: int,
        reference: ReferenceLogps | None = None,
        mode: str | None = None,
        live: LiveReference | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.device, self.pad_id, self.reference = cfg, device, pad_id, reference
        self.mode = mode or cfg.training.forward_mode
        self.live = live
        self.defer_gradient_sync = defers_gradient_sync(cfg.parallel)
        self.with_logweights = losses.needs_logweights(cfg.loss)
        self.shared_length = losses.needs_shared_length(cfg.loss)
        self.batch_coupled = losses.batch_coupled(cfg.loss)
        self.loss_state = losses.LossState(device)  # batch-coupled losses' (checkpointed)
        self.state_bytes: dict[str, int] | None = None  # local shards, after the first update
        self.sequence = getattr(model, "sequence", None)  # `SequenceLogprobs.sequence` (no model: None)
        self.counts = self.sequence is None or self.sequence.counts  # this rank's pair metrics count

    def prepare(self, batch: PairBatch) -> MicroBatch:
        """Build `batch`'s inputs on the host and start their copies to the device."""
        return MicroBatch(
            FORWARD_MODES[self.mode].inputs(
                batch, self.pad_id, self.device, self.shared_length, self.sequence
            ),
            to_device(batch.valid, self.device),
            to_device(batch.pair_ids, self.device),
            batch.real_tokens,
            None if batch.desirable is None else to_device(batch.desirable, self.device),
        )

    def logps(self, micro: MicroBatch, reference: ReferenceLogps | None) -> losses.PreferenceLogps:
        """Forward: the policy's log-probs of `micro`, with the reference's when given (a live
        reference's forward of `micro` when there is one)."""
        live = self.live.scores(micro.inputs) if self.live is not None else None
        logps = score_pairs(self.model, micro.inputs, self.with_logweights, live)
        logps.desirable = micro.desirable
        if reference is not None:  # the cache (None under a live reference)
            ref = reference.select(micro.pair_ids, self.device)
            logps.ref_chosen_logps, logps.ref_rejected_logps = ref.chosen, ref.rejected
            logps.ref_chosen_shared_logps = ref.chosen_shared
            logps.ref_rejected_shared_logps = ref.rejected_shared
        return logps

    def counted(self, valid: Tensor) -> Tensor:
        """`valid` [B] as the pair metrics count it: all False on a sequence group's ranks but the
        first (they hold the same pairs)."""
        return valid & self.counts

    def pair_losses(
        self, micro: MicroBatch, reference: ReferenceLogps | None, context: losses.BatchContext | None = None
    ) -> tuple[losses.PreferenceLogps, losses.LossOutput, Tensor]:
        """Forward: (log-probs, loss output, per-pair losses with padding pairs zeroed). Without
        `context`, batch-coupled losses take `micro`'s valid pairs as the whole batch
        (evaluation: `losses.valid_batch`)."""
        logps = self.logps(micro, reference)
        if context is None and losses.batch_coupled(self.cfg.loss):
            context = losses.valid_batch(logps, self.cfg.loss, micro.valid)
        out = losses.compute_loss(logps, self.cfg.loss, context)
        return logps, out, out.losses * micro.valid

    def batch_contexts(self, micros: list[MicroBatch]) -> tuple[list[losses.BatchContext], dict[str, Tensor]]:
        """The `BatchContext` of each of this rank's micro-batches from the step's global batch
        (a no-grad forward of each, all-gathered across ranks, in pair-id order; of a sequence
        group's ranks, which hold the same pairs, the first one's), and the loss state after this
        step. Collective. Every rank holds the same number of pairs, all valid
        (`engine.data.sampler.rank_micro_batches`), so nothing is read on the host."""
        with torch.no_grad():
            parts = [self.logps(micro, self.reference) for micro in micros]
        names = [f.name for f in dataclasses.fields(parts[0]) if getattr(parts[0], f.name) is not None]
        columns = [torch.cat([getattr(part, name) for part in parts]).double() for name in names]
        local = torch.stack([*columns, torch.cat([m.pair_ids for m in micros]).double()])  # [fields + 1, n]
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        gathered = [local]
        if world_size > 1:
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(gathered, local)
        if self.sequence is not None:  # one copy of each data-parallel rank's pairs
            gathered, rank = gathered[:: self.sequence.size], rank // self.sequence.size
        table = torch.cat(gathered, dim=1)
        order = torch.argsort(table[-1], stable=True)
        dtype = parts[0].chosen_logps.dtype
        fields = {name: table[i, order].to(dtype) for i, name in enumerate(names)}
        stats, state = losses.step_stats(
            losses.PreferenceLogps(**fields), self.cfg.loss, self.loss_state.values
        )
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order), device=order.device)
        mine = position[rank * local.shape[1] : (rank + 1) * local.shape[1]]
        return [losses.BatchContext(stats, at) for at in mine.split([len(m.pair_ids) for m in micros])], state

    def __call__(
        self, batches: list[PairBatch], window: PairMetrics | None = None, poison: bool = False
    ) -> StepResult:
        """Step over `batches` (this rank's micro-batches), adding their metrics to `window`.
        `poison` makes the loss NaN (the FSDPO_FAULT_NAN_STEP test hook)."""
        lr = self.scheduler.get_last_lr()[0]
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        # batch-coupled losses: every micro-batch's inputs first, for the pre-pass
        prepared = [self.prepare(batch) for batch in batches] if self.batch_coupled and batches else None
        if prepared and not all(bool(batch.valid.all()) for batch in batches):  # host tensors
            raise ValueError("batch-coupled losses need whole global batches (no padding pairs)")
        contexts, state = self.batch_contexts(prepared) if prepared else (None, self.loss_state.values)
        upcoming = None
        if batches:
            upcoming = prepared[0] if prepared else self.prepare(batches[0])
        for index in range(len(batches)):
            micro = upcoming
            if self.defer_gradient_sync:  # reduce gradients across ranks once, on the last one
                self.model.set_requires_gradient_sync(index == len(batches) - 1)
            context = contexts[index] if contexts else None
            logps, out, pair_losses = self.pair_losses(micro, self.reference, context)
            if poison:
                pair_losses = pair_losses * float("nan")
            loss = pair_losses.sum() / self.cfg.training.global_batch_size
            nonfinite |= ~torch.isfinite(loss)
            if index + 1 < len(batches):  # the next inputs, built while this forward runs
                upcoming = prepared[index + 1] if prepared else self.prepare(batches[index + 1])
            loss.backward()
            if window is not None:
                window.add(pair_losses, out, logps, self.counted(micro.valid))
                window.tokens += micro.real_tokens if self.counts else 0

        # one collective decides both: skip the update (a non-finite loss on some rank) and stop
        # after this step (a stop signal on some rank; SIGTERM's number wins over SIGINT's); its
        # read is the step's one wait for the device
        flags = torch.stack([nonfinite.float(), torch.full((), float(stop_signal()), device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, stop = (int(v) for v in flags.tolist())
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return StepResult(lr, torch.tensor(float("nan")), True, stop)
        self.loss_state.values = state  # a skipped step leaves the running statistics as they were

        max_norm = self.cfg.optimizer.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None],
            max_norm if max_norm > 0 else float("inf"),
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        if self.state_bytes is None:
            self.state_bytes = local_state_bytes(self.model, self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(lr, grad_norm, False, stop)
