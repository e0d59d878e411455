"""Which pairs each rank reads at each step, how they are batched, and what padding that costs."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import TrainingConfig
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
    # unpaired examples (chosen: the completion, rejected: the KL completion): [B] float, 1.0 for
    # desirable ones; None for preference pairs
    desirable: torch.Tensor | None = None

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
        desirable=None
        if not pairs or pairs[0].desirable is None
        else torch.tensor([p.desirable for p in pairs], dtype=torch.float32),
    )


# ----------------------------------------------------------------------------------------------
# Token-budget micro-batches


def fewest_micro_batches(tokens: Sequence[int], budget: int) -> int:
    """How many micro-batches of at most `budget` tokens first-fit-decreasing packs `tokens`
    into (within 11/9 of the optimum; every single pair must fit)."""
    loads: list[int] = []
    for n in sorted(tokens, reverse=True):
        for i, load in enumerate(loads):
            if load + n <= budget:
                loads[i] += n
                break
        else:
            loads.append(n)
    return len(loads)


def split_by_tokens(tokens: Sequence[int], budget: int, count: int) -> list[list[int]]:
    """Positions 0..n-1 of `tokens` split into exactly `count` micro-batches of at most `budget`
    tokens each, as even as possible; `count` must be at least `fewest_micro_batches` and at
    most n.

    Longest-first onto the lightest micro-batch (LPT) balances them; where that overshoots the
    budget, first-fit-decreasing bins (which fit) are split, heaviest first, until there are
    `count`. Each micro-batch lists its positions in their original order; micro-batches are
    ordered by their first position.
    """
    n = len(tokens)
    if not 1 <= count <= n:
        raise ValueError(f"cannot split {n} pairs into {count} micro-batches")
    by_size = sorted(range(n), key=lambda i: (-tokens[i], i))
    heap = [(0, b) for b in range(count)]
    bins: list[list[int]] = [[] for _ in range(count)]
    for i in by_size:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + tokens[i], b))
    if max(load for load, _ in heap) > budget:
        bins, loads = [], []
        for i in by_size:
            for b, load in enumerate(loads):
                if load + tokens[i] <= budget:
                    bins[b].append(i)
                    loads[b] += tokens[i]
                    break
            else:
                bins.append([i])
                loads.append(tokens[i])
        while len(bins) < count:  # halve the heaviest splittable bin (both halves still fit)
            b = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: loads[b])
            members = bins.pop(b)
            loads.pop(b)
            halves: list[list[int]] = [[], []]
            half_loads = [0, 0]
            for i in members:  # already longest first
                side = int(half_loads[1] < half_loads[0])
                halves[side].append(i)
                half_loads[side] += tokens[i]
            bins += halves
            loads += half_loads
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def token_budget_micro_batches(
    rank_tokens: Sequence[Sequence[int]], rank: int, budget: int
) -> list[list[int]]:
    """Rank `rank`'s micro-batches (positions into its own slice) when every rank's slice of
    the step (`rank_tokens[r]`: tokens of each of rank r's pairs) is cut by a token budget.

    FSDP's collectives need every rank to run the same number of forwards, so each rank
    computes every rank's fewest micro-batches (the data order is known to all, no
    communication) and splits its own slice into the largest of those counts.
    """
    count = max(fewest_micro_batches(tokens, budget) for tokens in rank_tokens)
    return split_by_tokens(rank_tokens[rank], budget, count)


def rank_micro_batches(
    step_pairs: Sequence[int],
    rank: int,
    world_size: int,
    micro_batch_size: int,
    micro_batch_tokens: int = 0,
    pair_tokens: np.ndarray | None = None,
) -> list[list[int]]:
    """Rank `rank`'s micro-batches (pair indices) of one step's global batch `step_pairs`: its
    contiguous slice, cut into `micro_batch_size` pairs, or with `micro_batch_tokens` by that
    token budget (`pair_tokens[i]`: positions of pair i; `token_budget_micro_batches`)."""
    ranks = np.asarray(step_pairs, dtype=np.int64).reshape(world_size, -1)
    mine = ranks[rank]
    if micro_batch_tokens:
        batches = token_budget_micro_batches(
            [pair_tokens[pairs] for pairs in ranks], rank, micro_batch_tokens
        )
        return [[int(mine[i]) for i in batch] for batch in batches]
    m = micro_batch_size
    return [mine[i : i + m].tolist() for i in range(0, len(mine), m)]


@dataclass(frozen=True)
class BatchPlan:
    """How each step's global batch splits over ranks and micro-batches (`BatchPlan.split`): the
    one rule, which the sampler, the dry run and the bench all follow."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    pairs_per_rank: int
    accumulation_steps: int  # 0: set by the token budget, step by step
    micro_batch_tokens: int = 0

    @classmethod
    def split(
        cls, global_batch_size: int, micro_batch_size: int, world_size: int, micro_batch_tokens: int = 0
    ) -> BatchPlan:
        """A UserError unless the global batch splits evenly over the ranks and, without a token
        budget, into micro-batches of `micro_batch_size` pairs."""
        per_rank, rem = divmod(global_batch_size, world_size)
        if micro_batch_tokens and rem:
            raise UserError(
                f"training.global_batch_size={global_batch_size} must be a multiple of the {world_size} ranks"
            )
        if not micro_batch_tokens and (rem or per_rank % micro_batch_size):
            raise UserError(
                f"training.global_batch_size={global_batch_size} must be a multiple of "
                f"training.micro_batch_size={micro_batch_size} x {world_size} ranks"
            )
        accumulation = 0 if micro_batch_tokens else per_rank // micro_batch_size
        return cls(
            world_size, global_batch_size, micro_batch_size, per_rank, accumulation, micro_batch_tokens
        )


def plan_batches(training: TrainingConfig, world_size: int) -> BatchPlan:
    """`BatchPlan.split` of a recipe's `[training]` table over `world_size` ranks."""
    t = training
    return BatchPlan.split(t.global_batch_size, t.micro_batch_size, world_size, t.micro_batch_tokens)


class GlobalBatchSampler:
    """Which pairs each rank reads at each optimizer step.

    Every step takes the next `global_batch_size` pairs of a seeded per-epoch order; rank r
    reads its contiguous slice of them, split into micro-batches. The order is a pure function
    of (seed, epoch), so the data position is just `step x global_batch_size` consumed pairs, the
    same for any world size, and the set of pairs in a step does not depend on how it is split.
    Pairs past the last whole global batch of an epoch (`unused_per_epoch`, a different random set
    each epoch) wait for a later epoch's shuffle.

    Micro-batches hold `micro_batch_size` pairs, or with `micro_batch_tokens` (packed forward
    modes; `pair_tokens` gives each pair's positions) as many pairs as fit that many tokens:
    the count of micro-batches then varies by step but is the same on every rank
    (`token_budget_micro_batches`).

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
        micro_batch_tokens: int = 0,
        pair_tokens: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        split = BatchPlan.split(global_batch_size, micro_batch_size, world_size, micro_batch_tokens)
        if micro_batch_tokens:
            if pair_tokens is None or len(pair_tokens) != num_pairs:
                raise ValueError("micro_batch_tokens needs the tokens of every pair")
            longest = int(np.argmax(pair_tokens)) if num_pairs else 0
            if num_pairs and pair_tokens[longest] > micro_batch_tokens:
                raise UserError(
                    f"training.micro_batch_tokens={micro_batch_tokens} is smaller than the longest pair "
                    f"(pair {longest}: {int(pair_tokens[longest])} tokens in this forward mode); raise it "
                    "to at least that or lower data.max_length"
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
        self.world_size, self.per_rank = world_size, split.pairs_per_rank
        self.micro_batch_tokens = micro_batch_tokens
        self.pair_tokens = np.asarray(pair_tokens, dtype=np.int64) if micro_batch_tokens else None
        self.accumulation_steps = split.accumulation_steps  # 0: varies by step (a token budget)
        self.steps_per_epoch = num_pairs // global_batch_size
        # pairs each epoch leaves out (a different random set each epoch)
        self.unused_per_epoch = num_pairs - self.steps_per_epoch * global_batch_size
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
        """This rank's pairs of optimizer step `step`, as a list of micro-batches."""
        order = self.epoch_order(self.epoch_of(step))
        first = (step % self.steps_per_epoch) * self.global_batch_size
        return rank_micro_batches(
            order[first : first + self.global_batch_size].tolist(),  # the step's one read of the order
            self.rank,
            self.world_size,
            self.micro_batch_size,
            self.micro_batch_tokens,
            self.pair_tokens,
        )


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
