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
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedTokenizerBase

from engine import losses
from engine.config import Config, DataSource
from engine.data import PreferenceDataset, collate, shard_for_inference
from engine.distributed import World, log
from engine.errors import UserError
from engine.forward import FORWARD_MODES, policy_logps, to_device
from engine.model import adapter_description
from engine.progress import Progress
from engine.reference_cache import (
    ReferenceLogps,
    load_reference_cache,
    reference_cache_key,
    save_reference_cache,
)


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
) -> ReferenceLogps:
    was_training = model.training
    model.eval()
    n = len(dataset)
    # chosen, rejected, filled (, chosen shared, rejected shared)
    sums = torch.zeros(5 if shared_length else 3, n, dtype=torch.float64, device=device)
    start = time.perf_counter()
    shards = shard_for_inference(n, batch_size, rank, world_size)
    progress = Progress(n, f"reference log-probs ({name})", "pair", enabled=rank == 0)
    for indices, valid in shards:
        batch = collate(dataset, indices, valid)
        logps = policy_logps(mode, model, batch, pad_id, device, shared_length=shared_length)
        ids, keep = to_device(batch.pair_ids, device), to_device(batch.valid, device)
        values = [logps.chosen_logps, logps.rejected_logps, keep]
        if shared_length:
            values += [logps.chosen_shared_logps, logps.rejected_shared_logps]
        # padding pairs add zeros (no boolean indexing: its output size would stop the host)
        for row, value in zip(sums, values):
            row.index_add_(0, ids, torch.where(keep, value.double(), 0.0))
        progress.update(int(batch.valid.sum()) * world_size)  # host flags
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
        or None when there is no data set or the loss needs none."""
        if dataset is None or not losses.needs_reference(self.cfg.loss):
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
                shared_length,
            )  # fmt: skip
        if world.is_main:
            path = save_reference_cache(self.dir, key, dataset, reference)
            log(f"reference log-probs ({name}): cached in {path}")
        if dist.is_initialized():
            dist.barrier()
        return reference.to(world.device)
