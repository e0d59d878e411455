"""The length-grouped sampler and the padding cost of a batching."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data import GlobalBatchSampler, PreferenceDataset, TokenizedPair, padding_fraction


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
