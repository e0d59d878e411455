"""Which pairs each rank reads at each step, how they are batched, and what padding that costs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.dataset import PreferenceDataset
from engine.errors import UserError

GROUP_BATCHES = 64  # group_by_length sorts chunks of this many global batches


@dataclass
class PairBatch:
    """A micro-batch of pairs as token lists; forward modes turn it into model inputs."""

    pair_ids: torch.Tensor  # [B] long: index into the dataset (and the reference log-probs)
    valid: torch.Tensor  # [B] bool: False for padding pairs that only keep ranks in step
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def real_tokens(self) -> int:
        """Tokens of both sequences of every valid pair (what a padding-free forward reads)."""
        return sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r, ok in zip(self.prompts, self.chosen, self.rejected, self.valid.tolist())
            if ok
        )


def collate(dataset: PreferenceDataset, indices: list[int], valid: list[bool] | None = None) -> PairBatch:
    pairs = [dataset.pairs[i] for i in indices]
    return PairBatch(
        pair_ids=torch.tensor([p.pair_id for p in pairs], dtype=torch.long),
        valid=torch.tensor(valid if valid is not None else [True] * len(pairs), dtype=torch.bool),
        prompts=[p.prompt_ids for p in pairs],
        chosen=[p.chosen_ids for p in pairs],
        rejected=[p.rejected_ids for p in pairs],
    )


class GlobalBatchSampler:
    """Which pairs each rank reads at each optimizer step.

    Every step takes the next `global_batch_size` pairs of a seeded per-epoch order; rank r
    reads its contiguous slice of them, split into micro-batches. The order is a pure function
    of (seed, epoch), so the data position is just `step x global_batch_size` consumed pairs, the
    same for any world size, and the set of pairs in a step does not depend on how it is split.
    Pairs past the last whole global batch of an epoch wait for a later epoch's shuffle.

    `group_by_length`: the epoch's permutation is cut into chunks of `GROUP_BATCHES` global
    batches, each chunk sorted by `lengths` (longest first) and cut into global batches, and the
    order of all the epoch's batches is shuffled. A global batch (and so each micro-batch, a
    contiguous slice of it) then holds similar lengths, while which batch comes when stays random.
    """

    def __init__(
        self,
        num_pairs: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        *,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_by_length: bool = False,
    ) -> None:
        per_rank, rem = divmod(global_batch_size, world_size)
        if rem or per_rank % micro_batch_size:
            raise UserError(
                f"training.global_batch_size={global_batch_size} must be a multiple of "
                f"training.micro_batch_size={micro_batch_size} x {world_size} ranks"
            )
        if num_pairs < global_batch_size:
            raise UserError(
                f"training.global_batch_size={global_batch_size} is larger than the "
                f"{num_pairs} training pairs"
            )
        if group_by_length and (lengths is None or len(lengths) != num_pairs):
            raise ValueError("group_by_length needs one length per pair")
        self.num_pairs, self.global_batch_size = num_pairs, global_batch_size
        self.micro_batch_size, self.rank, self.seed = micro_batch_size, rank, seed
        self.per_rank = per_rank
        self.accumulation_steps = per_rank // micro_batch_size
        self.steps_per_epoch = num_pairs // global_batch_size
        self.lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long) if group_by_length else None
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The pairs of the epoch's `steps_per_epoch` global batches, in order."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_pairs, generator=generator)
            order = order[: self.steps_per_epoch * self.global_batch_size]
            if self.lengths is not None:
                order = self._group_by_length(order, generator)
            self._epoch, self._order = epoch, order
        return self._order

    def _group_by_length(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        chunk = GROUP_BATCHES * self.global_batch_size
        sorted_chunks = []
        for start in range(0, len(order), chunk):
            block = order[start : start + chunk]
            by_length = torch.sort(self.lengths[block], descending=True, stable=True).indices
            sorted_chunks.append(block[by_length])
        batches = torch.cat(sorted_chunks).view(-1, self.global_batch_size)
        return batches[torch.randperm(len(batches), generator=generator)].reshape(-1)

    def micro_batches(self, step: int) -> list[list[int]]:
        order = self.epoch_order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch_size + self.rank * self.per_rank
        mine = order[start : start + self.per_rank].tolist()
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, len(mine), m)]


def shard_for_inference(
    num_pairs: int, batch_size: int, rank: int, world_size: int
) -> list[tuple[list[int], list[bool]]]:
    """This rank's disjoint share of all pairs (r, r+W, ...) in batches of `batch_size`.

    Every rank gets the same number of batches (FSDP's collectives need ranks in step), so the
    shorter shares are padded with repeats of pair 0 marked invalid.
    """
    mine = list(range(rank, num_pairs, world_size))
    per_rank = -(-num_pairs // world_size)
    num_batches = -(-per_rank // batch_size)
    valid = [True] * len(mine) + [False] * (num_batches * batch_size - len(mine))
    mine += [0] * (len(valid) - len(mine))
    return [(mine[i : i + batch_size], valid[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def padding_fraction(
    dataset: PreferenceDataset,
    micro_batch_size: int,
    mode: str = "concatenated",
    *,
    global_batch_size: int | None = None,
    group_by_length: bool = False,
    seed: int = 0,
) -> float:
    """Share of the padded token slots that are padding over one epoch of the sampler.

    Micro-batches are contiguous slices of each global batch whatever the world size, so this
    does not depend on the number of ranks. `concatenated`: one [2B, T] batch per micro-batch;
    `separate`: chosen [B, Tc] and rejected [B, Tr]; `packed`: no padding.
    """
    m = micro_batch_size
    sampler = GlobalBatchSampler(
        len(dataset),
        global_batch_size or m,
        m,
        0,
        1,
        seed,
        lengths=dataset.sequence_lengths() if group_by_length else None,
        group_by_length=group_by_length,
    )
    lengths = dataset.lengths()[sampler.epoch_order(0).numpy()].reshape(-1, m, 3)
    prompt, chosen, rejected = lengths[..., 0], lengths[..., 1], lengths[..., 2]
    real = int((2 * prompt + chosen + rejected).sum())
    chosen_width, rejected_width = (prompt + chosen).max(axis=1), (prompt + rejected).max(axis=1)
    if mode == "concatenated":
        slots = int(2 * m * np.maximum(chosen_width, rejected_width).sum())
    elif mode == "separate":
        slots = int(m * (chosen_width + rejected_width).sum())
    elif mode == "packed":
        return 0.0
    else:
        raise ValueError(f"unknown forward mode {mode!r}")
    return 1.0 - real / slots
