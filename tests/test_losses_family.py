"""ORPO, CPO, AlphaPO, f-DPO and Cal-DPO beyond the per-loss references of tests/test_losses.py:
the new settings leave the existing losses bit for bit unchanged at their defaults, their limits
and numerics, the recipe checks, and agreement with TRL 1.16's own loss code (when installed).
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import losses
from engine.config import LossConfig
from engine.errors import UserError
from engine.losses import LOSSES, PreferenceLogps, compute_loss
from engine.recipe import load_config
from tests.conftest import REPO
from tests.test_losses import (
    F_DIVERGENCE_LOSSES,
    HUGE_PAIRS,
    LN2,
    Pair,
    all_pairs,
    assert_relative,
    grad_of,
    moderate_pairs,
    to_logps,
    variants,
)

# The losses registered before f-DPO and AlphaPO existed
EARLIER_LOSSES = [
    *("dpo", "dpo_norm", "simpo", "wpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair"),
    *("bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sft"),
]
DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def _outputs(name: str, cfg: LossConfig, pairs: list[Pair], dtype: torch.dtype) -> list[torch.Tensor]:
    logps = to_logps(pairs, dtype, requires_grad=True)
    out = LOSSES[name].fn(logps, cfg)
    out.losses.sum().backward()
    extras = [out.extras[k] for k in sorted(out.extras)]
    grads = [grad_of(logps.chosen_logps), grad_of(logps.rejected_logps)]
    return [out.losses, out.chosen_rewards, out.rejected_rewards, *extras, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_defaults_leave_earlier_losses_bit_identical(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the defaults (reverse KL, alphapo_alpha 0) every earlier loss gives the same bits, values
    and gradients, as with the f-divergence and AlphaPO steps taken out (the code before them)."""
    pairs = all_pairs() + HUGE_PAIRS
    cases = [(name, cfg) for name in EARLIER_LOSSES for cfg in variants(name)[:2]]
    current = [_outputs(name, cfg, pairs, dtype) for name, cfg in cases]
    monkeypatch.setattr(losses, "_f_scores", lambda chosen, rejected, cfg: (chosen, rejected))
    monkeypatch.setattr(losses, "_f_margin", lambda chosen, rejected, cfg: chosen - rejected)
    monkeypatch.setattr(losses, "_power_shape", lambda x, alpha: x)
    for (name, cfg), now in zip(cases, current):
        before = _outputs(name, cfg, pairs, dtype)
        assert len(before) == len(now)
        for a, b in zip(now, before):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "wpo", "robust", "exo_pair"])
def test_step0_is_the_same_for_every_f_divergence(name: str, divergence: str) -> None:
    """f'(1) = 0 for every divergence, so policy == reference gives the reverse KL's step-0 loss
    (ln 2 for the logistic losses), length-normalised or not."""
    pairs = [replace(p, rc=p.pc, rr=p.pr, lwc=0.0, lwr=0.0) for p in moderate_pairs(4, 8)]
    step0 = compute_loss(to_logps(pairs), LossConfig(type=name)).losses
    out = compute_loss(to_logps(pairs), LossConfig(type=name, f_divergence=divergence, f_alpha=0.3))
    torch.testing.assert_close(out.losses, step0, rtol=0, atol=1e-15)
    if name != "exo_pair":
        torch.testing.assert_close(out.losses, torch.full((8,), LN2, dtype=torch.float64))


@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
def test_alpha_divergence_spans_reverse_to_forward_kl(name: str) -> None:
    """The paper's alpha-divergence tends to the reverse KL as alpha -> 0 and is the forward KL at
    alpha = 1 (Wang et al. 2023, Table 1)."""
    pairs = moderate_pairs(seed=6, count=12, spread=4.0)

    def run(**settings: object) -> torch.Tensor:
        return compute_loss(to_logps(pairs), LossConfig(type=name, beta=0.5, **settings)).losses

    near_zero = run(f_divergence="alpha_divergence", f_alpha=1e-7)
    torch.testing.assert_close(near_zero, run(), rtol=1e-5, atol=1e-8)
    near_one = run(f_divergence="alpha_divergence", f_alpha=1 - 1e-9)
    torch.testing.assert_close(near_one, run(f_divergence="forward_kl"), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["simpo", "cpo"])
def test_alphapo_tends_to_the_log_reward(name: str) -> None:
    pairs = moderate_pairs(seed=7, count=12)
    cfg = LossConfig(type=name, beta=2.5, label_smoothing=0.1)
    log_reward = compute_loss(to_logps(pairs), cfg)
    small = compute_loss(to_logps(pairs), replace(cfg, alphapo_alpha=1e-9))
    torch.testing.assert_close(small.losses, log_reward.losses, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(small.chosen_rewards, log_reward.chosen_rewards, rtol=1e-6, atol=1e-9)


def test_orpo_log_odds_near_certainty_in_float32() -> None:
    """As the mean log-prob s -> 0, log(1 - exp(s)) computed as log1p(-exp(s)) in float32 loses
    every digit (TRL #1473, PR #4763); ORPO's log1mexp keeps float32 at float64's value, and s = 0
    (certainty, or a pair without tokens) stays finite."""
    means = [-0.5, -1e-2, -1e-4, -1e-6, -3e-7]
    pairs = [Pair(s, -2.0, 0.0, 0.0, 1, 1) for s in means]
    logps = to_logps(pairs, torch.float32)
    out = compute_loss(logps, LossConfig(type="orpo"))
    chosen = [s - math.log(-math.expm1(s)) for s in means]  # log odds = log p - log(1 - p)
    rejected = -2.0 - math.log(-math.expm1(-2.0))
    assert_relative(out.extras["log_odds_chosen"], [c - rejected for c in chosen], rtol=2e-6, atol=0.0)
    naive = logps.chosen_logps - torch.log1p(-torch.exp(logps.chosen_logps))
    assert (naive[3:] - torch.tensor(chosen[3:])).abs().min().item() > 5e-3  # the cancellation
    certain = to_logps([Pair(0.0, -2.0, 0.0, 0.0, 4, 1), Pair(0.0, 0.0, 0.0, 0.0, 0, 0)], torch.float32, True)
    out = compute_loss(certain, LossConfig(type="orpo"))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(certain.chosen_logps.grad).all()
    assert torch.isfinite(certain.rejected_logps.grad).all()
    assert out.extras["log_odds_chosen"][0].item() == pytest.approx(
        -math.log(2**-24) + math.log(math.expm1(2.0))
    )


def test_cal_dpo_mean_equals_the_reference_code_batch_form() -> None:
    """The reference code adds F.mse_loss (a batch mean) to every pair; fsdpo's per-pair squares
    have the same mean over the batch."""
    pairs = moderate_pairs(seed=8, count=10)
    cfg = LossConfig(type="cal_dpo", beta=0.3)
    logps = to_logps(pairs)
    a = logps.chosen_logps - logps.ref_chosen_logps
    b = logps.rejected_logps - logps.ref_rejected_logps
    target = torch.tensor(1 / (2 * cfg.beta), dtype=torch.float64)
    code = -torch.nn.functional.logsigmoid(a - b) + 0.5 * (
        torch.nn.functional.mse_loss(a, target.expand_as(a))
        + torch.nn.functional.mse_loss(b, -target.expand_as(b))
    )
    torch.testing.assert_close(compute_loss(logps, cfg).losses.mean(), code.mean(), rtol=1e-12, atol=0)


def test_reference_free_losses_skip_the_reference() -> None:
    for name in ("orpo", "cpo"):
        assert not losses.needs_reference(LossConfig(type=name))
    assert losses.needs_reference(LossConfig(type="cal_dpo"))
    no_reference = replace(to_logps(moderate_pairs(9, 3)), ref_chosen_logps=None, ref_rejected_logps=None)
    for name in ("orpo", "cpo"):
        assert torch.isfinite(compute_loss(no_reference, LossConfig(type=name)).losses).all()


# ----------------------------------------------------------------------------------------------
# Recipe checks


def _recipe(tmp_path: Path, loss: str) -> Path:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npath = "m"\n[data]\ntrain = ["t.jsonl"]\n[loss]\n' + loss)
    return recipe


def test_f_divergence_needs_losses_that_take_it(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_config(
            _recipe(tmp_path, 'type = ["nca_pair", "sft"]\nf_divergence = "forward_kl"\nf_alpha = 1.0\n')
        )
    assert e.value.lines == [  # in the recipe's order
        'loss.f_divergence: "forward_kl" applies to dpo, dpo_norm, wpo, ipo, hinge, robust, exo_pair, '
        'discopop, sft; not to nca_pair in loss.type (use "reverse_kl" with it)',
        "loss.f_alpha: expected a number in (0, 1), got 1.0",
    ]
    assert load_config(_recipe(tmp_path, 'type = ["ipo", "sft"]\nf_divergence = "js_divergence"\n')).loss.type
    with pytest.raises(UserError, match="f_divergence"):  # the loss API checks it too
        compute_loss(to_logps(moderate_pairs(1, 2)), LossConfig(type="orpo", f_divergence="forward_kl"))


def test_new_loss_settings_are_range_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_config(_recipe(tmp_path, 'type = "orpo"\norpo_lambda = -0.1\ncpo_alpha = -1.0\nf_alpha = 0.0\n'))
    assert e.value.lines == [
        "loss.orpo_lambda: expected a number >= 0, got -0.1",
        "loss.cpo_alpha: expected a number >= 0, got -1.0",
        "loss.f_alpha: expected a number in (0, 1), got 0.0",
    ]


def test_orpo_recipe_holds_the_papers_settings() -> None:
    cfg = load_config(
        REPO / "recipes" / "orpo_mistral_7b.toml", [f"model.path={REPO / 'tests/data/configs/llama-3-8b'}"]
    )
    assert (cfg.loss.type, cfg.loss.orpo_lambda, cfg.optimizer.lr) == ("orpo", 0.1, 5e-6)
    assert (cfg.training.global_batch_size, cfg.training.epochs, cfg.scheduler.warmup_steps) == (32, 5, 200)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 1792)
    assert cfg.data.train[0].path == "HuggingFaceH4/ultrafeedback_binarized"
    assert not losses.needs_reference(cfg.loss)


# ----------------------------------------------------------------------------------------------
# TRL 1.16's own loss code on the same per-pair tensors


def _random_logps(seed: int, count: int = 12) -> PreferenceLogps:
    """Summed log-probs of completions of 1-6 tokens, log-ratios of either sign; float64 tensors
    of float32 values (TRL's alpha-divergence takes float32 only)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 7, (2, count), generator=g).double()
    policy = -tokens * torch.empty(2, count, dtype=torch.float64).uniform_(0.1, 2.0, generator=g)
    ref = (policy + torch.randn(2, count, generator=g, dtype=torch.float64) * 2.0).float().double()
    policy = policy.float().double()
    return PreferenceLogps(policy[0], policy[1], tokens[0], tokens[1], ref[0], ref[1])


def _cpu() -> types.SimpleNamespace:
    return types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_orpo_matches_trl_odds_ratio_loss() -> None:
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logps = _random_logps(seed=10)
    cfg = LossConfig(type="orpo", beta=0.25, orpo_lambda=0.25)  # TRL's beta is both
    trainer = types.SimpleNamespace(beta=0.25, accelerator=_cpu())
    chosen = logps.chosen_logps / logps.chosen_tokens
    rejected = logps.rejected_logps / logps.rejected_tokens
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected
    )
    out = compute_loss(logps, cfg)
    # TRL's loss is nll - mean(trl_losses): its per-pair odds-ratio term is -trl_losses
    torch.testing.assert_close(
        (out.losses - out.extras["nll_loss"]).float(), -trl_losses, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(out.extras["nll_loss"], -chosen)
    torch.testing.assert_close(out.chosen_rewards.float(), trl_chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.float(), trl_rejected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.extras["log_odds_ratio"].mean().float(), trl_ratio, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        out.extras["log_odds_chosen"].mean().float(), trl_log_odds, rtol=1e-6, atol=1e-6
    )


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("alpha", [0.0, 0.01, -0.03])
@pytest.mark.parametrize("trl_type", ["sigmoid", "simpo"])
def test_cpo_and_simpo_match_trl_cpo_loss(trl_type: str, alpha: float) -> None:
    """TRL's CPOTrainer: loss_type "sigmoid" on summed log-probs is fsdpo's cpo (without its NLL),
    "simpo" on mean log-probs is simpo; `alpha` is AlphaPO's reward shape in both."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logps = _random_logps(seed=11)
    alpha = alpha * 25 if trl_type == "simpo" else alpha  # mean log-probs take a larger alpha
    cfg = LossConfig(beta=2.5, label_smoothing=0.1, gamma_beta_ratio=0.4, cpo_alpha=0.0, alphapo_alpha=alpha)
    trainer = types.SimpleNamespace(
        alpha=alpha,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        loss_type=trl_type,
        simpo_gamma=cfg.gamma_beta_ratio * cfg.beta,
        accelerator=_cpu(),
    )
    if trl_type == "sigmoid":
        out = compute_loss(logps, replace(cfg, type="cpo"))
        trl_out = CPOTrainer.cpo_loss(trainer, logps.chosen_logps, logps.rejected_logps)
    else:
        out = compute_loss(logps, replace(cfg, type="simpo"))
        means = (logps.chosen_logps / logps.chosen_tokens, logps.rejected_logps / logps.rejected_tokens)
        trl_out = CPOTrainer.cpo_loss(trainer, *means)
    for ours, theirs in zip((out.losses, out.chosen_rewards, out.rejected_rewards), trl_out):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def _trl_dpo_loss(
    logps: PreferenceLogps, trl_type: str, divergence: str, coef: float, ls: float
) -> torch.Tensor:
    """TRL 1.16 DPOTrainer._compute_loss on a stand-in trainer and model whose per-token log-probs
    sum to `logps` (precomputed reference log-probs, completion masks of the pairs' lengths)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    count, width = len(logps.chosen_logps), 8
    tokens = torch.cat([logps.chosen_tokens, logps.rejected_tokens]).long()
    completion_mask = (torch.arange(width) >= 1) & (torch.arange(width) <= tokens[:, None])
    per_token = torch.zeros(2 * count, width - 1)
    per_token[:, 0] = torch.cat([logps.chosen_logps, logps.rejected_logps]).float()
    outputs = types.SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_cpu(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=divergence,
        f_alpha_divergence_coef=coef,
        loss_types=[trl_type],
        loss_weights=[1.0],
        beta=0.5,
        label_smoothing=ls,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=0.05),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * count, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * count, width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": logps.ref_chosen_logps.float(),
        "ref_rejected_logps": logps.ref_rejected_logps.float(),
    }
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


TRL_DPO_TYPES = {
    "sigmoid": ("dpo", 0.0),  # TRL 1.16's sigmoid has no label smoothing
    "sigmoid_norm": ("dpo_norm", 0.0),
    "hinge": ("hinge", 0.0),
    "ipo": ("ipo", 0.0),
    "exo_pair": ("exo_pair", 0.1),
    "robust": ("robust", 0.1),
    "discopop": ("discopop", 0.0),
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("trl_type", list(TRL_DPO_TYPES))
def test_f_divergences_match_trl_dpo_trainer(trl_type: str, divergence: str) -> None:
    """TRL's f_alpha_divergence_coef c has f'(u) = (u^(c-1) - 1) / (c - 1): the paper's alpha is 1 - c."""
    pytest.importorskip("trl")
    name, ls = TRL_DPO_TYPES[trl_type]
    logps = _random_logps(seed=12)
    cfg = LossConfig(type=name, beta=0.5, label_smoothing=ls, f_divergence=divergence, f_alpha=0.3)
    theirs = _trl_dpo_loss(logps, trl_type, divergence, coef=1 - cfg.f_alpha, ls=ls)
    ours = compute_loss(logps, cfg).losses.mean()  # float64 on the same float32 values
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-6)


def test_a_setting_no_loss_of_the_recipe_reads_is_an_error(tmp_path: Path) -> None:
    """No `[loss]` setting is silently ignored: each one changed from its default must be read by
    a loss of `loss.type` (what its function reads, `LossSpec.reads`)."""
    refused = {
        'type = "ipo"\nlabel_smoothing = 0.1\n': "loss.label_smoothing=0.1 changes nothing",
        'type = "dpo"\ngamma_beta_ratio = 1.0\n': "(simpo)",
        'type = "dpo"\nalphapo_alpha = 0.25\n': "(simpo, cpo)",
        'type = "sft"\nld_alpha = 0.5\n': "loss.ld_alpha=0.5 changes nothing for loss.type ['sft']",
        'type = "dpo"\nld_sides = "policy"\n': "needs loss.ld_alpha below 1",
        'type = "dpo"\nf_alpha = 0.3\n': 'needs loss.f_divergence = "alpha_divergence"',
    }
    for body, words in refused.items():
        with pytest.raises(UserError) as e:
            load_config(_recipe(tmp_path, body))
        assert len(e.value.lines) == 1 and words in e.value.lines[0], (body, e.value.lines)
    for body in (
        'type = ["ipo", "dpo"]\nlabel_smoothing = 0.1\n',
        'type = "simpo"\nalphapo_alpha = 0.25\ngamma_beta_ratio = 1.0\n',
        'type = "dpo"\nld_alpha = 0.5\nld_sides = "policy"\n',
        'type = "dpo"\nf_divergence = "alpha_divergence"\nf_alpha = 0.3\n',
    ):
        assert load_config(_recipe(tmp_path, body)).loss  # each read by a loss of the recipe
    assert LOSSES["simpo"].reads >= {"gamma_beta_ratio", "alphapo_alpha", "label_smoothing"}
