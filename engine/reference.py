"""Reference log-probs: computed once, before training, by the policy itself.

At that point the policy *is* the reference (same initial weights), so no second copy of the
model ever exists. Every rank scores a disjoint share of the pairs in eval mode under no_grad,
with a larger batch than training; the shares are summed across ranks (each pair is filled by
exactly one rank, so the sum is exact) and a completeness check fails loudly if any pair is
missing.

The pairs are laid out by the training forward mode when it is padding-free (`packed`,
`prefix_shared`), else as `concatenated` (one forward; `separate` gives the same numbers). All
modes agree to fp32 rounding, so a cache built under one mode serves the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.data import PreferenceDataset, collate, shard_for_inference
from engine.distributed import log
from engine.forward import policy_logps, to_device
from engine.progress import Progress


@dataclass
class ReferenceLogps:
    """The reference log-probs of every pair of a dataset. Training keeps them on the device
    (`to`, once: 8 bytes a pair) and looks a micro-batch up there, so no step copies them."""

    chosen: torch.Tensor  # [N] fp32, summed reference log-probs of each pair's chosen completion
    rejected: torch.Tensor  # [N]

    def to(self, device: torch.device) -> ReferenceLogps:
        return ReferenceLogps(self.chosen.to(device), self.rejected.to(device))

    def lookup(self, pair_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs `pair_ids`, indexed where the table lives, on `device` (with the table and
        the ids on `device` already: no copy)."""
        ids = pair_ids.to(self.chosen.device)
        return self.chosen.index_select(0, ids).to(device), self.rejected.index_select(0, ids).to(device)


def reference_layout(training_mode: str) -> str:
    """The forward mode reference log-probs are scored with (see the module docstring)."""
    return training_mode if training_mode in ("packed", "prefix_shared") else "concatenated"


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
) -> ReferenceLogps:
    was_training = model.training
    model.eval()
    n = len(dataset)
    sums = torch.zeros(3, n, dtype=torch.float64, device=device)  # chosen, rejected, filled
    start = time.perf_counter()
    shards = shard_for_inference(n, batch_size, rank, world_size)
    progress = Progress(n, f"reference log-probs ({name})", "pair", enabled=rank == 0)
    for indices, valid in shards:
        batch = collate(dataset, indices, valid)
        logps = policy_logps(mode, model, batch, pad_id, device)
        ids, keep = to_device(batch.pair_ids, device), to_device(batch.valid, device)
        # padding pairs add zeros (no boolean indexing: its output size would stop the host)
        sums[0].index_add_(0, ids, torch.where(keep, logps.chosen_logps.double(), 0.0))
        sums[1].index_add_(0, ids, torch.where(keep, logps.rejected_logps.double(), 0.0))
        sums[2].index_add_(0, ids, keep.double())
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
    return ReferenceLogps(sums[0].float().cpu(), sums[1].float().cpu())
