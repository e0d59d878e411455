"""Every registered loss against an independent float64 transcription of its paper's formula.

The references below are written per pair in plain Python `math` (no engine code, no torch), from
the formulas in each loss's docstring. Inputs are multiples of 1/64 below 2^14 in magnitude, so
they are exact in float32 too and the float32 check measures only float32 arithmetic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch

from engine.config import LossConfig
from engine.losses import (
    LOSSES,
    LossOutput,
    PreferenceLogps,
    compute_loss,
    needs_logweights,
    needs_reference,
)

LN2 = math.log(2.0)
ALL_LOSSES = [
    "dpo",
    "dpo_norm",
    "simpo",
    "wpo",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "cal_dpo",
    "cpo",
    "orpo",
]
REFERENCE_FREE = {"simpo", "sft", "cpo", "orpo"}
# The losses that take loss.f_divergence, and those that take loss.alphapo_alpha
F_DIVERGENCE_LOSSES = ["dpo", "dpo_norm", "wpo", "ipo", "hinge", "robust", "exo_pair", "discopop"]
ALPHAPO_LOSSES = ["simpo", "cpo"]


# ----------------------------------------------------------------------------------------------
# Plain-math references


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Pair:
    pc: float  # policy chosen, summed
    pr: float  # policy rejected
    rc: float  # reference chosen
    rr: float  # reference rejected
    nc: float  # chosen tokens
    nr: float  # rejected tokens
    lwc: float = 0.0  # WPO log-weights
    lwr: float = 0.0


# (loss, chosen reward, rejected reward) of one pair; `batch` is the whole batch (no loss here reads it).
Reference = Callable[[Pair, LossConfig, list[Pair]], tuple[float, float, float]]


def logistic(z: float, ls: float) -> float:
    """cDPO: -(1 - ls) log sigmoid(z) - ls log sigmoid(-z)."""
    return -(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)


def summed_rewards(p: Pair, beta: float) -> tuple[float, float]:
    return beta * (p.pc - p.rc), beta * (p.pr - p.rr)


def capped_exp(x: float) -> float:
    """exp(x) with x capped at 40, the engine's documented cap of f-divergence and AlphaPO exponents."""
    return math.exp(min(x, 40.0))


def f_prime(logratio: float, c: LossConfig) -> float:
    """f'(u) of u = exp(logratio), shifted to f'(1) = 0 (f-DPO, Wang et al. 2023, Table 1)."""
    if c.f_divergence == "reverse_kl":
        return logratio  # log u
    if c.f_divergence == "forward_kl":
        return 1 - capped_exp(-logratio)  # 1 - 1/u
    if c.f_divergence == "js_divergence":
        return math.log(2) + log_sigmoid(logratio)  # log(2u / (1 + u)) = log 2 - log(1 + 1/u)
    return (1 - capped_exp(-c.f_alpha * logratio)) / c.f_alpha  # (1 - u^-alpha) / alpha


def h_summed(p: Pair, c: LossConfig | None = None) -> float:
    """f'(u_c) - f'(u_r) of the summed log-ratios; (pi_c - ref_c) - (pi_r - ref_r) without `c`."""
    if c is None:
        return (p.pc - p.rc) - (p.pr - p.rr)
    return f_prime(p.pc - p.rc, c) - f_prime(p.pr - p.rr, c)


def h_per_token(p: Pair, c: LossConfig) -> float:
    return f_prime(p.pc - p.rc, c) / p.nc - f_prime(p.pr - p.rr, c) / p.nr


def ref_dpo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    return (logistic(c.beta * h_summed(p, c), c.label_smoothing), *summed_rewards(p, c.beta))


def ref_dpo_norm(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    chosen, rejected = (p.pc - p.rc) / p.nc, (p.pr - p.rr) / p.nr
    loss = logistic(c.beta * h_per_token(p, c), c.label_smoothing)
    return loss, c.beta * chosen, c.beta * rejected


def alphapo_reward(logp: float, alpha: float) -> float:
    """AlphaPO's reward (1 - p^-alpha) / alpha of p = exp(logp); log p at alpha = 0."""
    return logp if alpha == 0 else (1 - capped_exp(-alpha * logp)) / alpha


def ref_simpo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    gamma = c.gamma_beta_ratio * c.beta
    r_c = alphapo_reward(p.pc / p.nc, c.alphapo_alpha)
    r_r = alphapo_reward(p.pr / p.nr, c.alphapo_alpha)
    return logistic(c.beta * (r_c - r_r) - gamma, c.label_smoothing), c.beta * r_c, c.beta * r_r


def wpo_weight(p: Pair, c: LossConfig) -> float:
    weight = math.exp(p.lwc + p.lwr)
    return min(weight, 1.0) if c.wpo_clamp else weight


def ref_wpo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    loss = wpo_weight(p, c) * logistic(c.beta * h_summed(p, c), c.label_smoothing)
    return (loss, *summed_rewards(p, c.beta))


def ref_ipo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    h = h_per_token(p, c) if c.ipo_normalize else h_summed(p, c)
    return ((h - 1 / (2 * c.beta)) ** 2, *summed_rewards(p, c.beta))


def ref_hinge(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    return (max(0.0, 1 - c.beta * h_summed(p, c)), *summed_rewards(p, c.beta))


def ref_robust(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    z, ls = c.beta * h_summed(p, c), c.label_smoothing
    loss = ((1 - ls) * -log_sigmoid(z) + ls * log_sigmoid(-z)) / (1 - 2 * ls)
    return (loss, *summed_rewards(p, c.beta))


def ref_exo_pair(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    z = c.beta * h_summed(p, c)
    eps = c.label_smoothing or 1e-3
    # KL between Bernoulli(sigmoid(z)) and the target Bernoulli(1 - eps)
    loss = sigmoid(z) * (log_sigmoid(z) - math.log(1 - eps)) + sigmoid(-z) * (log_sigmoid(-z) - math.log(eps))
    return (loss, *summed_rewards(p, c.beta))


def ref_nca_pair(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    r_c, r_r = summed_rewards(p, c.beta)
    return -log_sigmoid(r_c) - 0.5 * log_sigmoid(-r_c) - 0.5 * log_sigmoid(-r_r), r_c, r_r


def ref_bco_pair(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    r_c, r_r = summed_rewards(p, c.beta)  # TRL 1.16's: no reward shift
    return -log_sigmoid(r_c) - log_sigmoid(-r_r), r_c, r_r


def ref_sppo_hard(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    a, b = p.pc - p.rc, p.pr - p.rr
    loss = (a - 1 / (2 * c.beta)) ** 2 + (b + 1 / (2 * c.beta)) ** 2
    return loss, c.beta * a, c.beta * b


def ref_apo_zero(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    r_c, r_r = summed_rewards(p, c.beta)
    return sigmoid(-r_c) + sigmoid(r_r), r_c, r_r  # 1 - sigmoid(x) = sigmoid(-x)


def ref_apo_down(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    r_c, r_r = summed_rewards(p, c.beta)
    return sigmoid(r_c) + sigmoid(-(r_c - r_r)), r_c, r_r


def ref_discopop(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    z, tau = c.beta * h_summed(p, c), c.discopop_tau
    modulation = sigmoid(z / tau)
    # exp(-z) * modulation, written in logs because exp(-z) alone overflows a float
    exponential = math.exp(-z + log_sigmoid(z / tau))
    loss = -log_sigmoid(z) * (1 - modulation) + exponential
    return (loss, *summed_rewards(p, c.beta))


def ref_sft(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    return -p.pc / p.nc, c.beta * p.pc / p.nc, c.beta * p.pr / p.nr


def ref_cal_dpo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    """Cal-DPO's reference code: -log sigmoid(a - b) + (MSE(a, 1/(2 beta)) + MSE(b, -1/(2 beta))) / 2."""
    a, b = p.pc - p.rc, p.pr - p.rr
    loss = -log_sigmoid(a - b) + 0.5 * ((a - 1 / (2 * c.beta)) ** 2 + (b + 1 / (2 * c.beta)) ** 2)
    return loss, c.beta * a, c.beta * b


def ref_cpo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    r_c, r_r = alphapo_reward(p.pc, c.alphapo_alpha), alphapo_reward(p.pr, c.alphapo_alpha)
    loss = logistic(c.beta * (r_c - r_r), c.label_smoothing) + c.cpo_alpha * (-p.pc / p.nc)
    return loss, c.beta * r_c, c.beta * r_r


# ORPO's cap on the mean log-prob: p <= 1 - 2^-24, the largest float32 below 1
ORPO_MAX_MEAN_LOGP = math.log(1 - 2.0**-24)


def orpo_log_odds(p: Pair) -> float:
    """log(odds(y_c) / odds(y_r)), odds = p / (1 - p), p = exp(mean log-prob) (ORPO eq. 4)."""
    s_c, s_r = min(p.pc / p.nc, ORPO_MAX_MEAN_LOGP), min(p.pr / p.nr, ORPO_MAX_MEAN_LOGP)
    return (s_c - math.log(1 - math.exp(s_c))) - (s_r - math.log(1 - math.exp(s_r)))


def ref_orpo(p: Pair, c: LossConfig, batch: list[Pair]) -> tuple[float, float, float]:
    loss = -p.pc / p.nc - c.orpo_lambda * log_sigmoid(orpo_log_odds(p))
    return loss, c.beta * p.pc / p.nc, c.beta * p.pr / p.nr


def reference_extras(name: str, p: Pair, c: LossConfig) -> dict[str, float]:
    """The per-pair metrics a loss reports (TRL's names for ORPO's and CPO's)."""
    if name == "wpo":
        return {"wpo/weight": wpo_weight(p, c)}
    if name == "cpo":
        return {"nll_loss": -p.pc / p.nc}
    if name == "orpo":
        log_odds = orpo_log_odds(p)
        return {
            "nll_loss": -p.pc / p.nc,
            "log_odds_ratio": log_sigmoid(log_odds),
            "log_odds_chosen": log_odds,
        }
    return {}


REFERENCES: dict[str, Reference] = {
    "dpo": ref_dpo,
    "dpo_norm": ref_dpo_norm,
    "simpo": ref_simpo,
    "wpo": ref_wpo,
    "ipo": ref_ipo,
    "hinge": ref_hinge,
    "robust": ref_robust,
    "exo_pair": ref_exo_pair,
    "nca_pair": ref_nca_pair,
    "bco_pair": ref_bco_pair,
    "sppo_hard": ref_sppo_hard,
    "apo_zero": ref_apo_zero,
    "apo_down": ref_apo_down,
    "discopop": ref_discopop,
    "sft": ref_sft,
    "cal_dpo": ref_cal_dpo,
    "cpo": ref_cpo,
    "orpo": ref_orpo,
}


def reference(name: str, pairs: list[Pair], cfg: LossConfig) -> tuple[list[float], ...]:
    rows = [REFERENCES[name](p, cfg, pairs) for p in pairs]
    return tuple(list(column) for column in zip(*rows))


# ----------------------------------------------------------------------------------------------
# Inputs


def dyadic(x: float) -> float:
    return round(x * 64) / 64


def moderate_pairs(seed: int, count: int, spread: float = 20.0) -> list[Pair]:
    """Random pairs, |beta h| up to ~10 for beta 0.1 and ~100 for beta 1.5, token counts from 1;
    the log-ratios are normal with standard deviation `spread`."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        nc = rng.choice([1, 2, 3, rng.randint(4, 400)])
        nr = rng.choice([1, 2, 3, rng.randint(4, 400)])
        pc, pr = -rng.uniform(0.5, 3.0) * nc, -rng.uniform(0.5, 3.0) * nr
        rc, rr = pc + rng.gauss(0, spread), pr + rng.gauss(0, spread)
        lwc, lwr = rng.uniform(-3, 1.2), rng.uniform(-3, 1.2)  # the clamp binds for some
        pairs.append(Pair(*(dyadic(v) for v in (pc, pr, rc, rr)), nc, nr, dyadic(lwc), dyadic(lwr)))
    return pairs


# |beta h| > 50 for beta = 0.1 (and per token with one-token completions), both signs, and pairs
# where both log-ratios are huge in the same direction (h small, r_c and r_r large).
EXTREME_PAIRS = [
    Pair(-10, -900, -900, -10, 1, 1, 0.5, 0.25),  # h = +1780
    Pair(-900, -10, -10, -900, 1, 1, -2, -1),  # h = -1780
    Pair(-12000, -40, -5, -9000.5, 3, 2, -40, -30),  # h = -3000.5
    Pair(-7, -15000, -16000, -3, 2, 1, 0.75, 0.5),  # h = +30990
    Pair(-5, -6, -1500, -1400, 2, 1, -0.5, -0.5),  # both ratios +
    Pair(-1500, -1400, -5, -6, 1, 2, -1, 0),  # both ratios -
    Pair(-600.5, -1.25, -1.5, -700.75, 1, 1, 0, 0),  # h = +100.25
    Pair(-1.25, -600.5, -700.75, -1.5, 1, 1, 0, 0),  # h = -100.25
]


def all_pairs() -> list[Pair]:
    return moderate_pairs(seed=0, count=24) + EXTREME_PAIRS


def to_logps(
    pairs: list[Pair], dtype: torch.dtype = torch.float64, requires_grad: bool = False
) -> PreferenceLogps:
    def column(name: str, grad: bool = False) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in pairs], dtype=dtype, requires_grad=grad)

    return PreferenceLogps(
        chosen_logps=column("pc", requires_grad),
        rejected_logps=column("pr", requires_grad),
        chosen_tokens=column("nc"),
        rejected_tokens=column("nr"),
        ref_chosen_logps=column("rc"),
        ref_rejected_logps=column("rr"),
        chosen_logweights=column("lwc"),
        rejected_logweights=column("lwr"),
    )


def variants(name: str) -> list[LossConfig]:
    """Defaults with beta 0.1, every switch flipped with beta 1.5 and label smoothing 0.2, and
    the f-divergences or AlphaPO reward shapes of the losses that take them."""
    flipped = LossConfig(
        type=name,
        beta=1.5,
        label_smoothing=0.2,
        gamma_beta_ratio=1.4,
        ipo_normalize=False,
        wpo_clamp=False,
        discopop_tau=0.5,
        orpo_lambda=0.7,
        cpo_alpha=0.3,
    )
    configs = [LossConfig(type=name, beta=0.1), flipped]
    if name in F_DIVERGENCE_LOSSES:
        configs += [
            LossConfig(type=name, f_divergence="forward_kl"),
            replace(flipped, f_divergence="js_divergence"),
            LossConfig(type=name, f_divergence="alpha_divergence", f_alpha=0.3),
            replace(flipped, f_divergence="alpha_divergence", f_alpha=0.8),
        ]
    if name in ALPHAPO_LOSSES:
        # cpo's reward is the summed log-prob (hundreds of nats): a small alpha stays uncapped
        for alpha in (0.25, -0.5) if name == "simpo" else (0.01, -0.02):
            configs.append(LossConfig(type=name, alphapo_alpha=alpha))
            configs.append(replace(flipped, alphapo_alpha=alpha))
    return configs


CASES = [
    pytest.param(name, cfg, id=f"{name}-{i}") for name in ALL_LOSSES for i, cfg in enumerate(variants(name))
]


def grad_of(tensor: torch.Tensor) -> torch.Tensor:
    """The gradient, zeros where the loss does not depend on the tensor (sft: rejected)."""
    return torch.zeros_like(tensor) if tensor.grad is None else tensor.grad


def assert_relative(actual: torch.Tensor, expected: list[float], rtol: float, atol: float) -> None:
    """|actual - expected| <= rtol |expected| + atol, elementwise."""
    expected_t = torch.tensor(expected, dtype=torch.float64)
    actual_t = actual.detach().to(torch.float64)
    assert actual_t.shape == expected_t.shape
    error = (actual_t - expected_t).abs()
    bound = rtol * expected_t.abs() + atol
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (
        f"index {worst}: got {actual_t[worst].item()!r}, expected {expected_t[worst].item()!r}"
    )


# ----------------------------------------------------------------------------------------------
# Registry


def test_every_loss_is_registered_and_has_a_reference() -> None:
    from tests.test_live_reference import TOKEN_KL  # referenced there, with the token-level KL
    from tests.test_losses_coupled import BATCH_COUPLED  # referenced there, over whole batches

    unpaired = ["apo_zero_unpaired"]  # pair-separable on unpaired examples: tests/test_kto.py
    assert sorted(LOSSES) == sorted(ALL_LOSSES + BATCH_COUPLED + unpaired + TOKEN_KL)
    assert sorted(REFERENCES) == sorted(ALL_LOSSES)


def test_needs_reference_and_logweights() -> None:
    for name in ALL_LOSSES:
        assert needs_reference(LossConfig(type=name)) is (name not in REFERENCE_FREE), name
        assert needs_logweights(LossConfig(type=name)) is (name == "wpo"), name
    assert not needs_reference(LossConfig(type=["simpo", "sft"]))
    assert needs_reference(LossConfig(type=["sft", "dpo"]))
    assert needs_logweights(LossConfig(type=["sft", "wpo"]))
    assert not needs_logweights(LossConfig(type=["dpo", "sft"]))


def test_pair_separable_losses_do_not_depend_on_other_pairs() -> None:
    """(The batch-coupled ones, which do: tests/test_losses_coupled.py.)"""
    assert all(LOSSES[n].pair_separable for n in ALL_LOSSES)
    pairs = moderate_pairs(seed=1, count=6)
    moved = [pairs[0]] + [replace(p, pc=p.pc + 30, pr=p.pr - 10) for p in pairs[1:]]
    for name in ALL_LOSSES:
        cfg = LossConfig(type=name)
        first = LOSSES[name].fn(to_logps(pairs), cfg).losses[0].item()
        first_moved = LOSSES[name].fn(to_logps(moved), cfg).losses[0].item()
        assert first == first_moved, name


# ----------------------------------------------------------------------------------------------
# Values against the references


@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_float64_matches_reference(name: str, cfg: LossConfig) -> None:
    pairs = all_pairs()
    out = LOSSES[name].fn(to_logps(pairs, requires_grad=True), cfg)
    losses, chosen_rewards, rejected_rewards = reference(name, pairs, cfg)
    assert out.losses.dtype == torch.float64 and out.losses.requires_grad
    assert_relative(out.losses, losses, rtol=1e-6, atol=0.0)
    assert_relative(out.chosen_rewards, chosen_rewards, rtol=1e-6, atol=0.0)
    assert_relative(out.rejected_rewards, rejected_rewards, rtol=1e-6, atol=0.0)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    expected_extras = [reference_extras(name, p, cfg) for p in pairs]
    assert sorted(out.extras) == sorted(expected_extras[0])
    for metric, value in out.extras.items():
        assert not value.requires_grad
        assert_relative(value, [e[metric] for e in expected_extras], rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_float32_matches_float64_reference(name: str, cfg: LossConfig) -> None:
    pairs = all_pairs()
    logps = to_logps(pairs, torch.float32, requires_grad=True)
    assert torch.equal(logps.chosen_logps.double(), to_logps(pairs).chosen_logps)  # exact inputs
    out = LOSSES[name].fn(logps, cfg)
    losses, chosen_rewards, rejected_rewards = reference(name, pairs, cfg)
    assert out.losses.dtype == torch.float32
    # atol: losses such as exp(-178) are below float32's smallest normal number (~1e-38); near
    # its minimum (f-divergences land there) exo_pair is a difference of terms ~1e-2, which
    # float32 resolves to ~1e-9
    assert_relative(out.losses, losses, rtol=1e-5, atol=1e-8 if name == "exo_pair" else 1e-30)
    assert_relative(out.chosen_rewards, chosen_rewards, rtol=1e-5, atol=1e-30)
    assert_relative(out.rejected_rewards, rejected_rewards, rtol=1e-5, atol=1e-30)


# ----------------------------------------------------------------------------------------------
# Gradients


def reference_gradients(name: str, pairs: list[Pair], cfg: LossConfig) -> tuple[list, list]:
    """Central differences of each pair's reference loss wrt pi_c and pi_r."""
    step = 1e-5
    grads: tuple[list[float], list[float]] = ([], [])
    for p in pairs:
        for field_name, out in (("pc", grads[0]), ("pr", grads[1])):
            value = getattr(p, field_name)
            up = REFERENCES[name](replace(p, **{field_name: value + step}), cfg, pairs)[0]
            down = REFERENCES[name](replace(p, **{field_name: value - step}), cfg, pairs)[0]
            out.append((up - down) / (2 * step))
    return grads


@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_gradients_match_reference_derivative(name: str, cfg: LossConfig) -> None:
    # 1/u = exp(-log u) makes the forward-KL and alpha-divergence losses of log-ratios ~ -40
    # about 1e17, where central differences in float64 resolve nothing: smaller log-ratios there
    exponential = cfg.f_divergence in ("forward_kl", "alpha_divergence")
    pairs = moderate_pairs(seed=2, count=16, spread=4.0 if exponential else 20.0)
    logps = to_logps(pairs, requires_grad=True)
    LOSSES[name].fn(logps, cfg).losses.sum().backward()
    d_chosen, d_rejected = reference_gradients(name, pairs, cfg)
    assert_relative(grad_of(logps.chosen_logps), d_chosen, rtol=1e-5, atol=1e-7)
    assert_relative(grad_of(logps.rejected_logps), d_rejected, rtol=1e-5, atol=1e-7)


HUGE_PAIRS = [
    *EXTREME_PAIRS,
    Pair(-1e6, -1.0, -1.0, -1e6, 1, 1, 5.0, 5.0),
    Pair(-1.0, -1e6, -1e6, -1.0, 1, 1, -50.0, -50.0),
    Pair(-1e6, -1e6, -1.0, -1.0, 1, 1, 0.0, 0.0),
    Pair(-1.0, -1.0, -1e6, -1e6, 1, 1, 0.0, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "cfg"), CASES)
def test_values_and_gradients_finite_for_extreme_inputs(
    name: str, cfg: LossConfig, dtype: torch.dtype
) -> None:
    logps = to_logps(HUGE_PAIRS, dtype, requires_grad=True)
    out = LOSSES[name].fn(logps, cfg)
    out.losses.sum().backward()
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards, *out.extras.values()):
        assert torch.isfinite(tensor).all(), tensor
    assert torch.isfinite(grad_of(logps.chosen_logps)).all(), logps.chosen_logps.grad
    assert torch.isfinite(grad_of(logps.rejected_logps)).all(), logps.rejected_logps.grad


def test_discopop_with_tau_above_one() -> None:
    """Above tau = 1 exp(-z) sigmoid(z / tau) is unbounded; it must stay finite (capped)."""
    cfg = LossConfig(type="discopop", beta=0.1, discopop_tau=2.0)
    pairs = moderate_pairs(seed=3, count=16)
    expected = reference("discopop", pairs, cfg)[0]
    assert_relative(LOSSES["discopop"].fn(to_logps(pairs), cfg).losses, expected, 1e-6, 0.0)
    logps = to_logps(HUGE_PAIRS, torch.float32, requires_grad=True)
    losses = LOSSES["discopop"].fn(logps, cfg).losses
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logps.chosen_logps.grad).all()
    assert losses.max().item() > 1e20  # z = -3000: the capped exponential dominates


def test_zero_token_counts_stay_finite() -> None:
    """A padded pair with no completion tokens is divided by 1, not 0."""
    empty = Pair(0.0, 0.0, 0.0, 0.0, 0, 0)
    one = replace(empty, nc=1, nr=1)
    for name in ALL_LOSSES:
        cfg = LossConfig(type=name)
        value = LOSSES[name].fn(to_logps([empty]), cfg).losses
        assert torch.isfinite(value).all(), name
        assert value.item() == LOSSES[name].fn(to_logps([one]), cfg).losses.item(), name


# ----------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "wpo", "robust"])
def test_step0_loss_is_ln2_when_policy_equals_reference(name: str, label_smoothing: float) -> None:
    pairs = [replace(p, rc=p.pc, rr=p.pr, lwc=0.0, lwr=0.0) for p in moderate_pairs(4, 8)]
    for wpo_clamp in (True, False):
        cfg = LossConfig(type=name, label_smoothing=label_smoothing, wpo_clamp=wpo_clamp)
        out = compute_loss(to_logps(pairs), cfg)
        torch.testing.assert_close(out.losses, torch.full((8,), LN2, dtype=torch.float64))
        assert out.chosen_rewards.abs().max().item() == 0.0
        assert out.rejected_rewards.abs().max().item() == 0.0


@pytest.mark.parametrize("wpo_clamp", [True, False])
def test_wpo_weight_is_detached_and_clamped(wpo_clamp: bool) -> None:
    # log-weight sums: +1.5 (clamped to weight 1 when wpo_clamp), -0.5, -4
    pairs = [
        Pair(-20, -25, -21, -24, 5, 6, 1.0, 0.5),
        Pair(-20, -25, -19, -27, 5, 6, -0.25, -0.25),
        Pair(-30, -10, -31, -12, 5, 6, -3.0, -1.0),
    ]
    cfg = LossConfig(type="wpo", beta=0.5, wpo_clamp=wpo_clamp)
    logps = to_logps(pairs, requires_grad=True)
    logps.chosen_logweights.requires_grad_(True)
    logps.rejected_logweights.requires_grad_(True)
    out = compute_loss(logps, cfg)
    out.losses.sum().backward()
    assert logps.chosen_logweights.grad is None and logps.rejected_logweights.grad is None
    expected = [1.0 if wpo_clamp else math.exp(1.5), math.exp(-0.5), math.exp(-4.0)]
    assert_relative(out.extras["wpo/weight"], expected, rtol=1e-12, atol=0.0)
    dpo_losses = reference("dpo", pairs, cfg)[0]
    assert_relative(out.losses, [w * d for w, d in zip(expected, dpo_losses)], 1e-12, 0.0)


def test_compute_loss_weighted_sum_reports_first_non_sft_rewards() -> None:
    pairs = all_pairs()
    dpo, dpo_chosen, dpo_rejected = reference("dpo", pairs, LossConfig())
    sft, sft_chosen, _ = reference("sft", pairs, LossConfig())

    out = compute_loss(to_logps(pairs), LossConfig(type=["dpo", "sft"], weights=[1.0, 0.5]))
    assert_relative(out.losses, [d + 0.5 * s for d, s in zip(dpo, sft)], 1e-6, 0.0)
    assert_relative(out.chosen_rewards, dpo_chosen, 1e-12, 0.0)
    assert_relative(out.rejected_rewards, dpo_rejected, 1e-12, 0.0)

    out = compute_loss(to_logps(pairs), LossConfig(type=["sft", "dpo"]))  # weights default 1
    assert_relative(out.losses, [d + s for d, s in zip(dpo, sft)], 1e-6, 0.0)
    assert_relative(out.chosen_rewards, dpo_chosen, 1e-12, 0.0)

    out = compute_loss(to_logps(pairs), LossConfig(type=["sft"]))
    assert_relative(out.losses, sft, 1e-12, 0.0)
    assert_relative(out.chosen_rewards, sft_chosen, 1e-12, 0.0)

    out = compute_loss(to_logps(pairs), LossConfig(type=["sft", "wpo"], weights=[0.3, 2.0]))
    assert "wpo/weight" in out.extras


def test_misuse_raises() -> None:
    pairs = moderate_pairs(5, 2)
    no_reference = replace(to_logps(pairs), ref_chosen_logps=None, ref_rejected_logps=None)
    with pytest.raises(ValueError, match="reference"):
        compute_loss(no_reference, LossConfig(type="dpo"))
    assert isinstance(compute_loss(no_reference, LossConfig(type="simpo")), LossOutput)
    no_weights = replace(to_logps(pairs), chosen_logweights=None)
    with pytest.raises(ValueError, match="logweights"):
        compute_loss(no_weights, LossConfig(type="wpo"))
    with pytest.raises(ValueError, match="unknown loss"):
        compute_loss(to_logps(pairs), LossConfig(type="dpo_typo"))
    with pytest.raises(ValueError, match="weights"):
        compute_loss(to_logps(pairs), LossConfig(type=["dpo", "sft"], weights=[1.0]))
