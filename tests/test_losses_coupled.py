"""Batch-coupled losses (AOT, BCO's running delta, beta-DPO): defined over the global batch.

Each loss against a float64 autograd transcription of its paper's formula on the whole batch
(values and gradients), the same batch split into micro-batches whose contexts come from the
whole batch (`losses.step_stats`, as `TrainStep.batch_contexts` builds them), and TRL 1.16 where
it has the loss. The real 2-rank runs are in tests/test_losses_training.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import LossConfig
from engine.losses import LOSSES, BatchContext, PreferenceLogps, compute_loss, step_stats
from tests.conftest import base_tables, main_in_process, train_rows, write_recipe
from tests.test_losses_family import _trl_dpo_loss

BATCH_COUPLED = ["aot", "aot_unpaired", "bco", "bco_batch", "beta_dpo", "kto"]  # kto: tests/test_kto.py
SORTED_OR_SHIFTED = ["aot", "aot_unpaired", "bco", "bco_batch"]  # beta-DPO's sampling: its own tests


def random_logps(seed: int, count: int = 8, dtype: torch.dtype = torch.float64) -> PreferenceLogps:
    """Distinct values (no ties in any sort), float32-exact so TRL sees the same numbers."""
    g = torch.Generator().manual_seed(seed)

    def column(scale: float, offset: float) -> torch.Tensor:
        return (offset + scale * torch.randn(count, generator=g)).float().to(dtype)

    return PreferenceLogps(
        chosen_logps=column(8.0, -40.0),
        rejected_logps=column(8.0, -45.0),
        chosen_tokens=torch.randint(3, 7, (count,), generator=g).to(dtype),
        rejected_tokens=torch.randint(3, 7, (count,), generator=g).to(dtype),
        ref_chosen_logps=column(8.0, -42.0),
        ref_rejected_logps=column(8.0, -43.0),
    )


def with_grad(logps: PreferenceLogps) -> PreferenceLogps:
    logps.chosen_logps.requires_grad_(True)
    logps.rejected_logps.requires_grad_(True)
    return logps


def paper_total(
    name: str, logps: PreferenceLogps, cfg: LossConfig, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss summed over the whole batch, transcribed from the paper (TRL's form); BCO's
    reward shift `delta` (default: the batch's mean reward)."""
    beta, ls = cfg.beta, cfg.label_smoothing
    pc, pr, rc, rr = (
        logps.chosen_logps,
        logps.rejected_logps,
        logps.ref_chosen_logps,
        logps.ref_rejected_logps,
    )
    if name == "aot":  # sorted policy margins against sorted reference margins
        delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
    elif name == "aot_unpaired":  # sorted chosen log-ratios against sorted rejected log-ratios
        delta = torch.sort(pc - rc).values - torch.sort(pr - rr).values
    elif name in ("bco", "bco_batch"):  # a single step: delta = its mean reward, detached
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        shift = torch.cat([r_c, r_r]).mean().detach() if delta is None else delta
        return (-F.logsigmoid(r_c - shift) - F.logsigmoid(-(r_r - shift))).sum()
    else:
        raise KeyError(name)
    return (-(1 - ls) * F.logsigmoid(beta * delta) - ls * F.logsigmoid(-beta * delta)).sum()


CONFIGS = [LossConfig(beta=0.1), LossConfig(beta=1.5, label_smoothing=0.2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "flipped"])
@pytest.mark.parametrize("name", SORTED_OR_SHIFTED)
def test_single_batch_matches_the_papers_formula(name: str, cfg: LossConfig) -> None:
    cfg = LossConfig(type=name, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    ours_in, paper_in = with_grad(random_logps(1)), with_grad(random_logps(1))
    out = compute_loss(ours_in, cfg)
    out.losses.sum().backward()
    expected = paper_total(name, paper_in, cfg)
    expected.backward()
    torch.testing.assert_close(out.losses.sum(), expected.detach(), rtol=1e-12, atol=0)
    for ours, paper in (
        (ours_in.chosen_logps, paper_in.chosen_logps),
        (ours_in.rejected_logps, paper_in.rejected_logps),
    ):
        torch.testing.assert_close(ours.grad, paper.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        out.chosen_rewards, cfg.beta * (paper_in.chosen_logps - paper_in.ref_chosen_logps).detach()
    )


@pytest.mark.parametrize("name", SORTED_OR_SHIFTED)
def test_micro_batches_with_the_global_context_equal_the_whole_batch(name: str) -> None:
    """Split 8 pairs, shuffled, into micro-batches of 3, 1 and 4 pairs: each loss's contexts from
    the whole batch give the whole batch's total and gradients."""
    cfg = LossConfig(type=name, beta=0.7, label_smoothing=0.1)
    whole = with_grad(random_logps(2))
    expected = paper_total(name, whole, cfg)
    expected.backward()
    detached = random_logps(2)
    stats, _ = step_stats(detached, cfg, {})
    permutation = torch.tensor([5, 0, 7, 2, 6, 1, 3, 4])
    total = torch.zeros((), dtype=torch.float64)
    grads = {
        "chosen_logps": torch.zeros(8, dtype=torch.float64),
        "rejected_logps": torch.zeros(8, dtype=torch.float64),
    }
    for at in permutation.split([3, 1, 4]):
        part = with_grad(
            PreferenceLogps(**{k: v[at].clone() for k, v in vars(detached).items() if v is not None})
        )
        losses = compute_loss(part, cfg, BatchContext(stats, at)).losses
        losses.sum().backward()
        total = total + losses.sum().detach()
        for key in grads:
            grads[key][at] += getattr(part, key).grad
    torch.testing.assert_close(total, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grads["chosen_logps"], whole.chosen_logps.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads["rejected_logps"], whole.rejected_logps.grad, rtol=1e-12, atol=1e-15)


def test_batch_coupled_losses_are_registered_with_their_statistics() -> None:
    assert sorted(n for n, spec in LOSSES.items() if spec.step_stats) == sorted(BATCH_COUPLED)
    assert all(not LOSSES[n].pair_separable for n in BATCH_COUPLED)
    assert LOSSES["aot"].reads >= {"beta", "label_smoothing"}


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_matches_trl_dpo_trainer(name: str, ls: float) -> None:
    pytest.importorskip("trl")
    logps = random_logps(3)
    theirs = _trl_dpo_loss(logps, name, "reverse_kl", coef=1.0, ls=ls)
    ours = compute_loss(logps, LossConfig(type=name, beta=0.5, label_smoothing=ls)).losses.mean()
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-6)


def test_bco_delta_is_the_running_mean_of_the_steps_mean_rewards() -> None:
    """Four steps of 8 pairs through `step_stats` with the state carried: each step's loss uses
    delta_t = (m_1 + ... + m_t) / t, m_s step s's mean reward, and bco_batch m_t alone."""
    cfg = LossConfig(type="bco", beta=0.3)
    state: dict = {}
    means = []
    for seed in range(4):
        logps = random_logps(10 + seed)
        r = cfg.beta * torch.cat(
            [logps.chosen_logps - logps.ref_chosen_logps, logps.rejected_logps - logps.ref_rejected_logps]
        )
        means.append(r.mean().item())
        stats, state = step_stats(logps, cfg, state)
        delta = torch.tensor(sum(means) / len(means), dtype=torch.float64)
        torch.testing.assert_close(stats["bco/delta"], delta, rtol=1e-12, atol=1e-14)
        ours = with_grad(random_logps(10 + seed))
        total = compute_loss(ours, cfg, BatchContext(stats, torch.arange(8))).losses.sum()
        total.backward()
        paper_in = with_grad(random_logps(10 + seed))
        expected = paper_total("bco", paper_in, cfg, delta)
        expected.backward()
        torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(ours.chosen_logps.grad, paper_in.chosen_logps.grad, rtol=1e-12, atol=1e-15)
        batch_stats, _ = step_stats(logps, LossConfig(type="bco_batch", beta=0.3), {})
        torch.testing.assert_close(batch_stats["bco/delta"].item(), means[-1], rtol=1e-12, atol=1e-14)
    assert state["bco/steps"].item() == 4 and state["bco/mean"].dtype == torch.float64
    assert means[0] != means[-1]  # the running mean differs from the last step's


def test_bco_pair_matches_trl_dpo_trainer() -> None:
    """TRL 1.16's bco_pair has no reward shift (fsdpo's bco_pair since; the shifted ones above)."""
    pytest.importorskip("trl")
    logps = random_logps(4)
    theirs = _trl_dpo_loss(logps, "bco_pair", "reverse_kl", coef=1.0, ls=0.0)
    ours = compute_loss(logps, LossConfig(type="bco_pair", beta=0.5)).losses.mean()
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["bco", "beta_dpo"])
def test_stateful_losses_resume_exactly(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, name: str
) -> None:
    """4 steps straight vs 2 + resume from step-2: the same losses and final state exactly; the
    same resume with the saved state taken out of trainer_state.json differs."""
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "straight")
    tables["data"]["eval"] = []
    tables["loss"] = {"type": name, "beta": 0.5}
    tables["training"]["micro_batch_size"] = 4
    tables["checkpoint"] = {"interval_steps": 2, "keep_last": 2}
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    assert main_in_process(recipe).returncode == 0
    straight = tmp_path / "straight"
    saved = straight / "checkpoints" / "step-2"
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["loss_state"][{"bco": "bco/steps", "beta_dpo": "beta_dpo/draws"}[name]] == 2

    blank = tmp_path / "blank" / "step-2"
    shutil.copytree(saved, blank)
    (blank / "trainer_state.json").write_text(json.dumps({**state, "loss_state": None}))
    losses_of = {}
    for name, checkpoint in (("resumed", saved), ("blank", blank)):
        overrides = [f"job.output_dir={tmp_path / name}", f"checkpoint.resume={checkpoint}"]
        proc = main_in_process(recipe, overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses_of[name] = [row["loss"] for row in train_rows(tmp_path / name)]
    expected = [row["loss"] for row in train_rows(straight)][2:]
    assert losses_of["resumed"] == expected
    assert losses_of["blank"][0] != expected[0]  # the statistics restarted at step 3
    final = json.loads((tmp_path / "resumed" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert (
        final["loss_state"]
        == json.loads((straight / "checkpoints" / "step-4" / "trainer_state.json").read_text())["loss_state"]
    )


def test_beta_dpo_matches_its_codes_formula_on_the_kept_pairs() -> None:
    """Two steps with the state carried: M, S the momentum-0.9 means (from 0) of the batch mean
    and std of h, K = int(N (1 - filter)) pairs kept, beta_b from their mean h, and the loss the
    kept pairs' mean of -log sigmoid(beta_b h) in value and gradient (beta_b detached)."""
    cfg = LossConfig(type="beta_dpo", beta=0.2, beta_dpo_alpha=0.6, beta_dpo_filter=0.25)
    state: dict = {}
    expected_mean = expected_std = 0.0
    for seed in (20, 21):
        logps = random_logps(seed, count=8)
        h = (logps.chosen_logps - logps.ref_chosen_logps) - (logps.rejected_logps - logps.ref_rejected_logps)
        expected_mean = 0.9 * expected_mean + 0.1 * h.mean().item()
        expected_std = 0.9 * expected_std + 0.1 * h.std().item()
        stats, state = step_stats(logps, cfg, state)
        torch.testing.assert_close(state["beta_dpo/gap_mean"].item(), expected_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["beta_dpo/gap_std"].item(), expected_std, rtol=1e-12, atol=1e-14)
        kept = stats["beta_dpo/weight"] > 0
        assert int(kept.sum()) == 6
        beta_b = max(0.2 * (1 + 0.6 * (h[kept].mean().item() - expected_mean)), 1e-3)
        torch.testing.assert_close(stats["beta_dpo/beta"].item(), beta_b, rtol=1e-12, atol=0)
        ours, paper_in = with_grad(random_logps(seed, count=8)), with_grad(random_logps(seed, count=8))
        out = compute_loss(ours, cfg, BatchContext(stats, torch.arange(8)))
        (out.losses.sum() / 8).backward()  # the trainer's sum / global batch size
        pc, pr, rc, rr = (
            paper_in.chosen_logps,
            paper_in.rejected_logps,
            paper_in.ref_chosen_logps,
            paper_in.ref_rejected_logps,
        )
        expected = -F.logsigmoid(beta_b * ((pc - rc) - (pr - rr)))[kept].mean()
        expected.backward()
        torch.testing.assert_close(out.losses.sum() / 8, expected.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(ours.chosen_logps.grad, paper_in.chosen_logps.grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(
            ours.rejected_logps.grad, paper_in.rejected_logps.grad, rtol=1e-12, atol=1e-15
        )
        assert torch.equal(out.extras["beta_dpo/kept"], kept.double())
    assert state["beta_dpo/draws"].item() == 2 and state["beta_dpo/draws"].device.type == "cpu"


def test_beta_dpo_first_step_ignores_rounding_in_the_margins() -> None:
    """At the first step (state from 0) margins of fp32 rounding, h ~ 1e-7 nats (a reference
    scored in another layout), keep the pairs h = 0 keeps, for every draw; without the noise floor
    their z-scores decided (checked to fail with the floor at float64's tiny)."""
    import dataclasses

    cfg = LossConfig(type="beta_dpo", beta_dpo_filter=0.5)
    exact = random_logps(40, count=8)
    exact = dataclasses.replace(
        exact, ref_chosen_logps=exact.chosen_logps, ref_rejected_logps=exact.rejected_logps
    )
    g = torch.Generator().manual_seed(41)
    rounded = dataclasses.replace(
        exact, ref_chosen_logps=exact.chosen_logps + 1e-7 * torch.randn(8, generator=g, dtype=torch.float64)
    )
    for draws in range(20):
        state = {"beta_dpo/draws": torch.tensor(draws)}
        kept = [step_stats(x, cfg, state)[0]["beta_dpo/weight"] > 0 for x in (exact, rounded)]
        assert torch.equal(*kept), draws
    # a real spread of margins (1e-2 nats) still weights the draw
    spread = dataclasses.replace(
        exact, ref_chosen_logps=exact.chosen_logps + 1e-2 * torch.randn(8, generator=g, dtype=torch.float64)
    )
    picks = [
        step_stats(x, cfg, {"beta_dpo/draws": torch.tensor(d)})[0]["beta_dpo/weight"] > 0
        for d in range(20)
        for x in (exact, spread)
    ]
    assert any(not torch.equal(a, b) for a, b in zip(picks[::2], picks[1::2]))


def test_beta_dpo_keeps_pairs_with_probability_proportional_to_their_weight() -> None:
    """Keeping 1 of 4 pairs over 4000 draws: each pair's frequency is its weight
    exp(-z^2 / 2) / sum (the code's torch.multinomial), z its margin's z-score in the batch."""
    cfg = LossConfig(type="beta_dpo", beta_dpo_filter=0.75, beta_dpo_momentum=0.0)
    logps = random_logps(30, count=4)
    h = (logps.chosen_logps - logps.ref_chosen_logps) - (logps.rejected_logps - logps.ref_rejected_logps)
    weight = torch.exp(-0.5 * ((h - h.mean()) / h.std()) ** 2)
    counts = torch.zeros(4)
    for draws in range(4000):
        stats, _ = step_stats(logps, cfg, {"beta_dpo/draws": torch.tensor(draws)})
        counts += (stats["beta_dpo/weight"] > 0).float()
    probability = weight / weight.sum()
    assert probability.min() > 0.02  # a meaningful spread
    torch.testing.assert_close(counts.double() / 4000, probability, rtol=0, atol=0.03)
