"""The length-grouped sampler and the padding cost of a batching."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import GlobalBatchSampler, PreferenceDataset, TokenizedPair
from engine.data.sampler import fewest_micro_batches, split_by_tokens
from engine.errors import UserError
from engine.forward import FORWARD_MODES, padding_fraction


def synthetic(n: int, seed: int = 0) -> PreferenceDataset:
    """Pairs with log-normal lengths (a long tail, like real preference data)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(4.5, 0.8, size=(n, 3)), 1, 2000).astype(int)
    return PreferenceDataset(
        [TokenizedPair(i, [1] * int(p), [2] * int(c), [3] * int(r)) for i, (p, c, r) in enumerate(lengths)]
    )


def test_padding_fraction_by_hand() -> None:
    """One micro-batch of two pairs: (prompt, chosen, rejected) = (2, 1, 2) and (4, 3, 1).
    Rows prompt+chosen are 3 and 7 tokens, prompt+rejected 4 and 5: 19 real tokens.
    concatenated: 4 rows x 7 = 28 slots; separate: 2 x 7 + 2 x 5 = 24 slots."""
    data = PreferenceDataset([TokenizedPair(0, [1, 1], [2], [3, 3]), TokenizedPair(1, [1] * 4, [2] * 3, [3])])
    assert padding_fraction(data, 2, "concatenated") == pytest.approx(1 - 19 / 28)
    assert padding_fraction(data, 2, "separate") == pytest.approx(1 - 19 / 24)
    assert padding_fraction(data, 2, "packed") == 0.0
    # one pair per micro-batch: 2 x 4 and 2 x 7 slots
    assert padding_fraction(data, 1, "concatenated") == pytest.approx(1 - 19 / 22)


def test_length_grouping_is_a_pure_function_of_seed_and_step_whatever_the_world_size() -> None:
    n, gbs = 1000, 8
    lengths = synthetic(n).sequence_lengths()
    steps = n // gbs

    def sampler(micro: int, rank: int, world: int, seed: int = 3) -> GlobalBatchSampler:
        return GlobalBatchSampler(n, gbs, micro, rank, world, seed, lengths=lengths, group_by_length=True)

    reference = sampler(8, 0, 1)
    for step in (0, 5, steps - 1, steps, 2 * steps + 7):  # crosses epochs; visited out of order
        expected = reference.micro_batches(step)[0]
        for world, micro in ((2, 2), (4, 1), (2, 4)):
            got = [
                i
                for rank in range(world)
                for mb in sampler(micro, rank, world).micro_batches(step)
                for i in mb
            ]
            assert got == expected
    # each epoch is a permutation of the pairs the ungrouped sampler would use in that epoch
    plain = GlobalBatchSampler(n, gbs, 8, 0, 1, 3)
    for epoch in (0, 1):
        grouped = reference.epoch_order(epoch).tolist()
        assert (
            sorted(grouped) == sorted(plain.epoch_order(epoch).tolist()) and len(set(grouped)) == steps * gbs
        )
    assert reference.epoch_order(0).tolist() != reference.epoch_order(1).tolist()  # reshuffled
    assert sampler(8, 0, 1, seed=4).epoch_order(0).tolist() != reference.epoch_order(0).tolist()
    # global batches hold similar lengths, and long batches are not all at the start
    batch_spread = [np.ptp(lengths[reference.micro_batches(s)[0]]) for s in range(steps)]
    plain_spread = [np.ptp(lengths[plain.micro_batches(s)[0]]) for s in range(steps)]
    assert np.median(batch_spread) < 0.2 * np.median(plain_spread)
    batch_max = [lengths[reference.micro_batches(s)[0]].max() for s in range(steps)]
    assert abs(np.corrcoef(np.arange(steps), batch_max)[0, 1]) < 0.3


def test_length_grouping_cuts_padding() -> None:
    data = synthetic(4096)
    for micro, gbs in ((4, 64), (8, 128)):
        plain = padding_fraction(data, micro, global_batch_size=gbs, seed=1)
        grouped = padding_fraction(data, micro, global_batch_size=gbs, group_by_length=True, seed=1)
        assert grouped < plain / 2, (plain, grouped)


# ----------------------------------------------------------------------------------------------
# Token-budget micro-batches


def test_token_budget_split_by_hand() -> None:
    """Six pairs of 100, 60, 50, 40, 30, 20 tokens (300) under a 150-token budget fit in two
    micro-batches: first-fit-decreasing packs {100, 50} and {60, 40, 30, 20}. Balancing
    longest-first onto the lighter micro-batch would overshoot (100+40+20 = 160), so the split
    falls back to the bins that fit."""
    tokens = [100, 60, 50, 40, 30, 20]
    assert fewest_micro_batches(tokens, 150) == 2
    assert split_by_tokens(tokens, 150, 2) == [[0, 2], [1, 3, 4, 5]]
    # three balance longest-first onto the lightest (ties to the earlier): 100 | 60 | 50, then
    # 40 -> {50}, 30 -> {60}, 20 -> {60, 30} (tied with {50, 40} at 90)
    assert split_by_tokens(tokens, 150, 3) == [[0], [1, 4, 5], [2, 3]]


def test_token_budget_split_fits_covers_and_takes_any_count() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        budget = int(rng.integers(50, 2000))
        tokens = rng.integers(1, budget + 1, size=int(rng.integers(1, 24))).tolist()
        fewest = fewest_micro_batches(tokens, budget)
        assert fewest >= -(-sum(tokens) // budget)
        for count in range(fewest, len(tokens) + 1):
            batches = split_by_tokens(tokens, budget, count)
            assert len(batches) == count and all(batches)
            assert sorted(i for b in batches for i in b) == list(range(len(tokens)))
            assert max(sum(tokens[i] for i in b) for b in batches) <= budget


@pytest.mark.parametrize("world", [1, 2, 4])
def test_token_budget_sampler_keeps_ranks_in_step_and_the_global_batch(world: int) -> None:
    """Every rank runs the same number of forwards each step (FSDP's collectives need it), no
    micro-batch exceeds the budget, and a step reads the same pairs as with micro_batch_size.
    The lengths are chosen so that ranks often need different counts on their own."""
    data = synthetic(512, seed=1)
    tokens = FORWARD_MODES["packed"].pair_positions(data.lengths())
    budget, gbs = int(tokens.max()) + 100, 16
    fixed = GlobalBatchSampler(len(data), gbs, 1, 0, 1, 5)
    samplers = [
        GlobalBatchSampler(len(data), gbs, 1, r, world, 5, micro_batch_tokens=budget, pair_tokens=tokens)
        for r in range(world)
    ]
    uneven = 0
    for step in range(fixed.steps_per_epoch):
        per_rank = [s.micro_batches(step) for s in samplers]
        assert len({len(batches) for batches in per_rank}) == 1
        assert all(tokens[b].sum() <= budget for batches in per_rank for b in batches)
        pairs = [i for batches in per_rank for b in batches for i in b]
        assert sorted(pairs) == sorted(i for b in fixed.micro_batches(step) for i in b)
        rank_slices = np.array([i for b in fixed.micro_batches(step) for i in b]).reshape(world, -1)
        uneven += len({fewest_micro_batches(tokens[s].tolist(), budget) for s in rank_slices}) > 1
    if world > 1:
        assert uneven > 0
    # prefix_shared counts the prompt once
    assert (
        FORWARD_MODES["prefix_shared"].pair_positions(data.lengths()) == tokens - data.lengths()[:, 0]
    ).all()


def test_token_budget_rejects_a_pair_longer_than_the_budget() -> None:
    data = synthetic(64)
    tokens = FORWARD_MODES["packed"].pair_positions(data.lengths())
    with pytest.raises(
        UserError, match=rf"micro_batch_tokens=10 .*pair {int(tokens.argmax())}: {tokens.max()} tokens"
    ):
        GlobalBatchSampler(64, 8, 1, 0, 2, 0, micro_batch_tokens=10, pair_tokens=tokens)
