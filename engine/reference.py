"""Reference log-probs: computed once, before training, by the policy itself.

At that point the policy *is* the reference (same initial weights), so no second copy of the
model ever exists. Every rank scores a disjoint share of the pairs in eval mode under no_grad,
with a larger batch than training; the shares are summed across ranks (each pair is filled by
exactly one rank, so the sum is exact) and a completeness check fails loudly if any pair is
missing.

The pairs are laid out by the training forward mode when it is padding-free (`packed`,
`prefix_shared`), else as `concatenated` (one forward; `separate` gives the same numbers). All
modes agree to fp32 rounding, so a cache built under one mode serves the others. With
`shared_length` (LD-DPO on both sides) each pair's sums over its shared length come too.

`ReferenceProvider` is the one path from a data set to its reference log-probs: key it
(`engine.reference_cache.reference_cache_key`), load the cache file, else compute them (adapters
off: the reference is the base model), rank 0 saves the file, every rank waits for it.

`LiveReference` is the other mode (`reference.mode = "live"`): a frozen reference model run on
every micro-batch beside the policy, through the same forward (`engine.forward.reference_scores`),
for what cached scalars cannot serve: TDPO's token-level KL (the reference's whole next-token
distributions) and TR-DPO (a reference that follows the policy, `sync`). Without LoRA it is a
second `SequenceLogprobs`, built and sharded as the policy (`engine.step.build_live_reference`),
so syncing copies local shards with no communication; with LoRA it is the policy itself with
its adapters disabled (no copy).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedTokenizerBase

from engine import losses
from engine.config import Config, DataSource
from engine.data import PreferenceDataset, collate, shard_for_inference
from engine.distributed import World, log
from engine.errors import UserError
from engine.forward import (
    FORWARD_MODES,
    ModelInputs,
    ReferenceScores,
    policy_logps,
    reference_scores,
    to_device,
)
from engine.model import adapter_description
from engine.progress import Progress
from engine.reference_cache import (
    ReferenceLogps,
    load_reference_cache,
    reference_cache_key,
    save_reference_cache,
)
from engine.sequence_parallel import data_parallel


def reference_layout(training_mode: str) -> str:
    """The forward mode reference log-probs are scored with (see the module docstring)."""
    return training_mode if FORWARD_MODES[training_mode].padding_free else "concatenated"


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    dataset: PreferenceDataset,
    pad_id: int,
    device: torch.device,
    batch_size: int,
    rank: int,
    world_size: int,
    name: str = "train",
    mode: str = "concatenated",
    shared_length: bool = False,
    sequence_parallel: int = 1,
) -> ReferenceLogps:
    """Collective: every pair's reference log-probs, each computed by one data-parallel rank (of
    `world_size` ranks in groups of `sequence_parallel`, whose first rank's sums count)."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    # chosen, rejected, filled (, chosen shared, rejected shared)
    sums = torch.zeros(5 if shared_length else 3, n, dtype=torch.float64, device=device)
    start = time.perf_counter()
    data_rank, data_size = data_parallel(rank, world_size, sequence_parallel)
    counts = rank % sequence_parallel == 0
    shards = shard_for_inference(n, batch_size, data_rank, data_size)
    progress = Progress(n, f"reference log-probs ({name})", "pair", enabled=rank == 0)
    for indices, valid in shards:
        batch = collate(dataset, indices, valid)
        logps = policy_logps(mode, model, batch, pad_id, device, shared_length=shared_length)
        ids, keep = to_device(batch.pair_ids, device), to_device(batch.valid & counts, device)
        values = [logps.chosen_logps, logps.rejected_logps, keep]
        if shared_length:
            values += [logps.chosen_shared_logps, logps.rejected_shared_logps]
        # padding pairs add zeros (no boolean indexing: its output size would stop the host)
        for row, value in zip(sums, values):
            row.index_add_(0, ids, torch.where(keep, value.double(), 0.0))
        progress.update(int(batch.valid.sum()) * data_size)  # host flags
    progress.close()
    if world_size > 1:
        dist.all_reduce(sums)
    elapsed = time.perf_counter() - start
    missing = (sums[2] != 1).nonzero().flatten().tolist()
    if missing:
        raise RuntimeError(f"reference log-probs incomplete: pairs {missing[:10]} not filled exactly once")
    log(
        f"reference log-probs ({name}): {n} pairs in {elapsed:.1f}s ({n / max(elapsed, 1e-9):.1f} pairs/s, "
        f"{mode} forward)"
    )
    model.train(was_training)
    values = sums.float().cpu()
    return ReferenceLogps(values[0], values[1], *values[3:])


class ReferenceProvider:
    """The reference log-probs of a run's data sets, from the model's current (initial) weights:
    `get` keys a data set, loads its cache file or computes and saves it. `forwards` counts the
    data sets computed rather than loaded."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        world: World,
        dtype: torch.dtype,
        resuming: bool = False,
    ) -> None:
        self.cfg, self.model, self.tokenizer, self.world = cfg, model, tokenizer, world
        self.dtype, self.resuming = dtype, resuming
        self.batch_size = cfg.reference.batch_size or 4 * cfg.training.micro_batch_size
        self.dir = Path(cfg.reference.cache_dir or Path(cfg.job.output_dir) / "reference")
        if self.dir.exists() and not self.dir.is_dir():  # before hours of forwards
            raise UserError(f"reference.cache_dir: {self.dir} is not a folder")
        self.forwards = 0

    def get(
        self, dataset: PreferenceDataset | None, name: str, sources: list[DataSource]
    ) -> ReferenceLogps | None:
        """Collective: the reference log-probs of `dataset` (built from `sources`) on the device,
        or None when there is no data set, the loss needs none or the reference is live."""
        if dataset is None or not losses.needs_reference(self.cfg.loss) or self.cfg.reference.mode == "live":
            return None
        cfg, world = self.cfg, self.world
        shared_length = losses.reference_needs_shared_length(cfg.loss)
        key = reference_cache_key(
            cfg.model, cfg.job.seed, self.tokenizer, dataset, cfg.data,
            adapter=adapter_description(cfg.lora), sources=sources,
            extra={"compute_dtype": str(self.dtype)}, cache_dir=self.dir,
        )  # fmt: skip
        cached = load_reference_cache(self.dir, key, dataset)
        if cached is not None and shared_length and not cached.has_shared:
            log(
                f"reference log-probs ({name}): {self.dir / key.file_name} has no shared-length sums "
                "(loss.ld_alpha); recomputing"
            )
        elif cached is not None:
            log(f"reference log-probs ({name}): loaded {self.dir / key.file_name}")
            return (cached if shared_length else cached.totals()).to(world.device)
        self.forwards += 1
        if self.resuming:
            log(
                f"reference log-probs ({name}): no cache on resume; rebuilding from the initial weights of model.path"
            )
        adapters_off = (
            self.model.causal_lm.disable_adapter() if cfg.lora.enabled else contextlib.nullcontext()
        )
        with adapters_off:  # the reference is the base model
            reference = compute_reference_logps(
                self.model, dataset, self.tokenizer.pad_token_id, world.device, self.batch_size,
                world.rank, world.world_size, name, reference_layout(cfg.training.forward_mode),
                shared_length, cfg.parallel.sequence_parallel,
            )  # fmt: skip
        if world.is_main:
            path = save_reference_cache(self.dir, key, dataset, reference)
            log(f"reference log-probs ({name}): cached in {path}")
        if dist.is_initialized():
            dist.barrier()
        return reference.to(world.device)


class LiveReference:
    """The live reference of `reference.mode = "live"` (see the module docstring). `model` is a
    frozen `SequenceLogprobs` sharded as the policy, or with `adapters_off` the policy itself,
    run with its LoRA adapters disabled. `token_kl`: the loss needs TDPO's token-level KL, so
    `scores` keeps the reference's hidden states and its LM head stays gathered (its chunks are
    recomputed in the policy's backward). `sync_steps`, `sync_alpha`: TR-DPO's schedule."""

    def __init__(
        self,
        model: nn.Module,
        token_kl: bool,
        adapters_off: bool = False,
        sync_steps: int = 0,
        sync_alpha: float = 1.0,
    ) -> None:
        self.model, self.token_kl, self.adapters_off = model, token_kl, adapters_off
        self.sync_steps, self.sync_alpha = sync_steps, sync_alpha
        self._forwarded = False  # a forward ran since the last `_release`
        if not adapters_off and not hasattr(FSDPModule, "reset_iter_state"):  # see `_release`
            raise UserError(
                f'reference.mode = "live": needs FSDPModule.reset_iter_state, which torch '
                f"{torch.__version__} lacks; upgrade torch (or use LoRA, whose reference is the policy)"
            )
        head = model.causal_lm.get_output_embeddings()
        if adapters_off and token_kl and isinstance(head, BaseTunerLayer):
            raise UserError(
                "lora.target_modules: LoRA on the LM head with a token-level KL loss (tdpo): the live "
                "reference is the base model, whose head the policy's adapters would change; leave the "
                "LM head out of lora.target_modules"
            )

    @contextlib.contextmanager
    def _as_reference(self) -> Iterator[None]:
        if self.adapters_off:  # the reference is the base model
            with self.model.causal_lm.disable_adapter():
                yield
        else:
            yield

    def scores(self, inputs: list[ModelInputs]) -> ReferenceScores:
        """The reference's scores of a micro-batch laid out as `inputs` (no grad)."""
        self._release()  # what the previous micro-batch, an evaluation or a checkpoint left
        with self._as_reference():
            scores = reference_scores(self.model, inputs, self.token_kl)
        self._forwarded = True
        if self.token_kl and not self.adapters_off:  # the policy's forward and backward call its head
            for module in (self.model, self.model.causal_lm.get_output_embeddings()):
                if isinstance(module, FSDPModule):
                    module.unshard()
        else:
            self._release()
        return scores

    def _release(self) -> None:
        """A clean FSDP state for the frozen reference, its shards registered: FSDP2 expects a
        backward after each forward, which resets its units; without it the output unit (and
        the root) stay gathered, and the chunked LM head leaves that unit mid-forward, where a
        plain `reshard` keeps it gathered (a sync would then write to the gathered copy, which
        the next reshard drops). `reset_iter_state` reshards every unit and resets that state.
        With LoRA the reference is the policy, whose backward does this."""
        if self._forwarded and not self.adapters_off and isinstance(self.model, FSDPModule):
            self.model.reset_iter_state()
        self._forwarded = False

    def due(self, step: int) -> bool:
        """Whether the reference is synced once `step` optimizer steps are done (TR-DPO)."""
        return self.sync_steps > 0 and step % self.sync_steps == 0

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        """TR-DPO: reference <- alpha policy + (1 - alpha) reference (a copy at alpha = 1), shard
        by shard: both models are sharded alike, so no rank communicates."""
        if self.adapters_off:
            raise ValueError("a LoRA live reference is the base model: it cannot be synced")
        self._release()  # write to the shards, not to gathered copies
        alpha = self.sync_alpha
        for (name, ref), (policy_name, param) in zip(
            self.model.named_parameters(), policy.named_parameters(), strict=True
        ):
            if name != policy_name:
                raise ValueError(f"live reference parameter {name} against the policy's {policy_name}")
            ref, param = _local(ref), _local(param)
            if alpha == 1.0:
                ref.copy_(param)
            else:
                ref.mul_(1.0 - alpha).add_(param, alpha=alpha)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
