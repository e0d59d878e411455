"""Preference losses as pure functions of per-pair log-probabilities, registered by name.

Each loss takes a `PreferenceLogps` (policy and, where needed, reference log-probs, each of shape
[B]) and the `[loss]` table, and returns per-pair losses and implicit rewards. Nothing here knows
about models, batches of tokens or ranks, so every loss is checked in tests/test_losses.py
against a float64 transcription of its paper's formula.

Batch-coupled losses (AOT, BCO's running shift, beta-DPO, KTO: registered with `step_stats`) are
defined over the optimizer step's global batch: the trainer computes their statistics once per
step from every rank's pairs (`step_stats`, a `BatchContext` per micro-batch) and they stay pure
functions of (per-pair tensors, config, context); running state lives in `LossState`. They are
checked in tests/test_losses_coupled.py.

Notation in the docstrings: pi_c, pi_r are the policy's summed log-probs of the chosen and
rejected completions, ref_c, ref_r the reference model's, n_c, n_r their completion token counts,
beta = `loss.beta`, ls = `loss.label_smoothing`, and h = (pi_c - ref_c) - (pi_r - ref_r) the
difference of summed log-ratios. Unless a docstring says otherwise, the implicit rewards are
beta * (pi_c - ref_c) and beta * (pi_r - ref_r).

f-DPO (`loss.f_divergence`, Wang et al. 2023) is a setting of the losses registered with
`f_divergence_ok`: each log-ratio log u they use (u = pi / ref) becomes f'(u) (`_f_scores`), so
their h is f'(u_c) - f'(u_r); their rewards stay beta log u. The default reverse KL is log u itself.

Numerical care: log sigmoid is always F.logsigmoid (never log(sigmoid(x))), 1 - sigmoid(x) is
written sigmoid(-x), and exponentials that could overflow are rewritten or clamped (see
`discopop_loss`, `wpo_loss`, `_power_shape`, `orpo_loss`), so values and gradients stay finite
for any finite input.
Token counts are clamped at 1 before dividing, so a padded pair with no tokens cannot make NaN.

LD-DPO (`loss.ld_alpha` < 1, `length_desensitized`) is a loss-level setting: `compute_loss`
rewrites the summed log-probs before any loss sees them, so pi_c, pi_r (and ref_c, ref_r with
`loss.ld_sides = "both"`) in every docstring below are the desensitised sums, for every loss
registered with `ld_weighted=True` (every reference-based loss and `simpo`; `sft`'s NLL stays the
true likelihood, as TRL's).
Token counts n_c, n_r stay the full lengths, as TRL divides by them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import LossConfig, Problems
from engine.errors import UserError


@dataclass
class PreferenceLogps:
    """Per-pair tensors, each shape [B], float32 (or float64 in tests)."""

    chosen_logps: Tensor  # policy log-prob of the chosen completion, summed over its tokens
    rejected_logps: Tensor
    chosen_tokens: Tensor  # number of completion tokens (float tensor)
    rejected_tokens: Tensor
    ref_chosen_logps: Tensor | None = None  # reference model, summed; None for reference-free losses
    ref_rejected_logps: Tensor | None = None
    chosen_logweights: Tensor | None = None  # WPO: per-sequence mean over completion tokens of
    rejected_logweights: Tensor | None = None  # log p(y_t) - log sum_v p(v)^2 (from the policy)
    # LD-DPO: summed over the pair's first min(n_c, n_r) tokens only (None unless ld_alpha < 1)
    chosen_shared_logps: Tensor | None = None
    rejected_shared_logps: Tensor | None = None
    ref_chosen_shared_logps: Tensor | None = None  # the reference's (ld_sides = "both")
    ref_rejected_shared_logps: Tensor | None = None
    # Unpaired losses (kto): each "pair" is an example, chosen its completion, rejected its KL
    # completion (another example's, `engine.data.dataset.unpaired_examples`); 1.0 for
    # desirable examples, 0.0 for undesirable ones. None for preference pairs.
    desirable: Tensor | None = None
    # TDPO: sum over the completion's tokens of KL(ref(. | x, y<t) || policy(. | x, y<t)), the
    # token-level KL of the two next-token distributions (differentiable in the policy's)
    chosen_token_kl: Tensor | None = None
    rejected_token_kl: Tensor | None = None


@dataclass
class LossOutput:
    losses: Tensor  # [B] per-pair loss (differentiable)
    chosen_rewards: Tensor  # [B] implicit reward, detached
    rejected_rewards: Tensor  # [B] detached
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-pair metrics [B], detached


@dataclass
class BatchContext:
    """What a batch-coupled loss (registered with `step_stats`) needs of the optimizer step's
    whole batch: `stats` from its `step_stats` over every valid pair of the global batch (all
    ranks, all micro-batches, in pair-id order: `engine.step.TrainStep.batch_contexts`), per pair
    [N] or per step (0-d), detached; `position` [B] the index in that order of each pair of the
    micro-batch the loss is called on (any index for padding pairs, whose loss the caller zeroes).
    A loss called without one treats the batch it is given as the whole batch (`whole_batch`)."""

    stats: dict[str, Tensor]
    position: Tensor


LossFn = Callable[..., LossOutput]  # (PreferenceLogps, LossConfig[, BatchContext | None])
# (global detached PreferenceLogps [N], the [loss] table, the running state or None) ->
# (stats for `BatchContext.stats`, the state after this step: kept unless the step is skipped)
StepStats = Callable[[PreferenceLogps, LossConfig, dict[str, Tensor] | None], tuple[dict, dict]]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool
    needs_logweights: bool = False
    pair_separable: bool = True  # False when a pair's loss depends on other pairs in the batch
    ld_weighted: bool = True  # sees LD-DPO's desensitised log-probs (`length_desensitized`)
    # Takes a non-default `loss.f_divergence`: built on the chosen-minus-rejected difference of
    # log-ratios (TRL's set), or without log-ratios at all (sft). See `check_settings`.
    f_divergence_ok: bool = False
    reads: frozenset[str] = frozenset()  # the `[loss]` fields its functions read (`_fields_read`)
    # Batch-coupled: defined over the optimizer step's global batch through a `BatchContext`
    # built from these statistics (implies pair_separable=False).
    step_stats: StepStats | None = None
    # Takes unpaired examples (`PreferenceLogps.desirable`), not preference pairs.
    unpaired: bool = False
    # Unpaired: reads the KL sequences (the rejected side, `unpaired_examples`); without, that
    # side is empty (no tokens, log-prob 0).
    kl_sequences: bool = False
    needs_token_kl: bool = False  # TDPO's sequential KL: a live reference (`reference.mode`)


LOSSES: dict[str, LossSpec] = {}


def _fields_read(fn: LossFn) -> frozenset[str]:
    """The `cfg.<field>` attributes `fn`'s own source reads: which settings a loss takes, so that
    `check_settings` can refuse one that no loss of the recipe would read."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return frozenset(
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg"
    )


def register(
    name: str,
    *,
    needs_reference: bool,
    needs_logweights: bool = False,
    pair_separable: bool = True,
    ld_weighted: bool = True,
    f_divergence_ok: bool = False,
    step_stats: StepStats | None = None,
    unpaired: bool = False,
    kl_sequences: bool = False,
    needs_token_kl: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator that adds a loss function to `LOSSES` under `name`; with `step_stats` it is
    batch-coupled (see `BatchContext`), with `unpaired` it takes unpaired examples (and with
    `kl_sequences` their KL sequences)."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        reads = _fields_read(fn) | (_fields_read(step_stats) if step_stats else frozenset())
        if unpaired:  # an unpaired loss weighs its examples by label (`_by_label`)
            reads |= _fields_read(_by_label)
        LOSSES[name] = LossSpec(
            fn,
            needs_reference,
            needs_logweights,
            pair_separable and step_stats is None,
            ld_weighted,
            f_divergence_ok,
            reads,
            step_stats,
            unpaired,
            kl_sequences,
            needs_token_kl,
        )
        return fn

    return add


# ----------------------------------------------------------------------------------------------
# Shared pieces


def _logratios(logps: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """Summed log-ratios (pi_c - ref_c, pi_r - ref_r)."""
    if logps.ref_chosen_logps is None or logps.ref_rejected_logps is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    return (
        logps.chosen_logps - logps.ref_chosen_logps,
        logps.rejected_logps - logps.ref_rejected_logps,
    )


def _per_token(summed: Tensor, tokens: Tensor) -> Tensor:
    return summed / tokens.clamp(min=1)


def _per_token_difference(chosen: Tensor, rejected: Tensor, logps: PreferenceLogps) -> Tensor:
    """chosen / n_c - rejected / n_r."""
    return _per_token(chosen, logps.chosen_tokens) - _per_token(rejected, logps.rejected_tokens)


def _sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - ls) log sigmoid(z) - ls log sigmoid(-z): logistic loss with flipped-label rate ls."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# The exponent of `_power_shape` is capped here for extreme inputs: exp(40) ~ 2e17 stays finite in
# float32 even squared (IPO squares f-divergence scores), while real inputs stay far below it.
_MAX_SHAPE_EXPONENT = 40.0


def _power_shape(x: Tensor, alpha: float) -> Tensor:
    """(1 - exp(-alpha x)) / alpha, i.e. (1 - u^-alpha) / alpha of u = exp(x); x itself (the limit)
    at alpha = 0. Written -expm1(-alpha x) / alpha (exact near x = 0), with the exponent capped at
    `_MAX_SHAPE_EXPONENT` (beyond it the value is constant and its gradient 0)."""
    if alpha == 0.0:
        return x
    return -torch.expm1((-alpha * x).clamp(max=_MAX_SHAPE_EXPONENT)) / alpha


# f'(u) of each f-divergence as a function of the log-ratio log u, shifted so f'(1) = 0 (a constant
# cancels in f'(u_c) - f'(u_r), and the zero keeps the step-0 loss at ln 2 for length-normalised
# losses too): Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization
# with Diverse Divergence Constraints", arXiv:2309.16240, Table 1; TRL's DPOTrainer shifts the same.
_F_SHAPES: dict[str, Callable[[Tensor, LossConfig], Tensor]] = {
    "reverse_kl": lambda logratio, cfg: logratio,  # log u
    "forward_kl": lambda logratio, cfg: _power_shape(logratio, 1.0),  # 1 - 1/u
    "js_divergence": lambda logratio, cfg: math.log(2.0) + F.logsigmoid(logratio),  # log(2u/(1+u))
    "alpha_divergence": lambda logratio, cfg: _power_shape(logratio, cfg.f_alpha),  # (1-u^-a)/a
}


def _f_scores(chosen: Tensor, rejected: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """f'(u) of the chosen and rejected log-ratios for `loss.f_divergence`; the log-ratios
    themselves (the same tensors) for the default reverse KL."""
    shape = _F_SHAPES[cfg.f_divergence]
    return shape(chosen, cfg), shape(rejected, cfg)


def _f_margin(chosen: Tensor, rejected: Tensor, cfg: LossConfig) -> Tensor:
    """h = f'(u_c) - f'(u_r) of summed log-ratios: (pi_c - ref_c) - (pi_r - ref_r) for reverse KL."""
    scored_chosen, scored_rejected = _f_scores(chosen, rejected, cfg)
    return scored_chosen - scored_rejected


def _output(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    extras: dict[str, Tensor] | None = None,
) -> LossOutput:
    extras = {name: value.detach() for name, value in (extras or {}).items()}
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), extras)


# ----------------------------------------------------------------------------------------------
# Losses with a reference model


@register("dpo", needs_reference=True, f_divergence_ok=True)
def dpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """DPO: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h).

    Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", arXiv:2305.18290. Label smoothing is conservative
    DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO").
    With `loss.f_divergence` this is f-DPO (Wang et al. 2023, arXiv:2309.16240, eq. 12).
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    losses = _sigmoid_loss(cfg.beta * _f_margin(chosen, rejected, cfg), cfg.label_smoothing)
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


@register("dpo_norm", needs_reference=True, f_divergence_ok=True)
def dpo_norm_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """Length-normalised DPO: DPO (with ls) on h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r.

    Tulu 3's `dpo_norm`: Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language Model
    Post-Training", arXiv:2411.15124. With `loss.f_divergence` the summed f'(u) are divided by the
    token counts (TRL's `sigmoid_norm`).
    Rewards: beta (pi_c - ref_c) / n_c, beta (pi_r - ref_r) / n_r (length-normalised).
    """
    summed_chosen, summed_rejected = _logratios(logps)
    scored_chosen, scored_rejected = _f_scores(summed_chosen, summed_rejected, cfg)
    h = _per_token_difference(scored_chosen, scored_rejected, logps)
    losses = _sigmoid_loss(cfg.beta * h, cfg.label_smoothing)
    chosen = _per_token(summed_chosen, logps.chosen_tokens)
    rejected = _per_token(summed_rejected, logps.rejected_tokens)
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


# Real WPO log-weights are below 0.5 log|V| per sequence (p / sum_v p(v)^2 <= sqrt(|V|)), so the
# exponent of an unclamped pair weight is below log|V| < 60 for any vocabulary; the cap only keeps
# corrupted inputs from overflowing float32.
_WPO_MAX_LOG_WEIGHT = 60.0


@register("wpo", needs_reference=True, needs_logweights=True, f_divergence_ok=True)
def wpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """Weighted DPO: w * DPO loss (with ls), w = exp(lw_c + lw_r), detached.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv:2406.11827. lw is a sequence's mean over completion tokens of
    log p(y_t) - log sum_v p(v)^2 under the policy. With `loss.wpo_clamp` w = min(w, 1), as
    in the paper's released code. No gradient flows through w. Without the clamp the exponent is
    capped at 60, which real log-weights never reach (see `_WPO_MAX_LOG_WEIGHT`).
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r). Extras: "wpo/weight" = w.
    """
    if logps.chosen_logweights is None or logps.rejected_logweights is None:
        raise ValueError("wpo needs chosen_logweights and rejected_logweights")
    log_weight = (logps.chosen_logweights + logps.rejected_logweights).detach()
    weight = torch.exp(log_weight.clamp(max=0.0 if cfg.wpo_clamp else _WPO_MAX_LOG_WEIGHT))
    chosen, rejected = _logratios(logps)
    losses = weight * _sigmoid_loss(cfg.beta * _f_margin(chosen, rejected, cfg), cfg.label_smoothing)
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected, {"wpo/weight": weight})


@register("ipo", needs_reference=True, f_divergence_ok=True)
def ipo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """IPO: (h - 1 / (2 beta))^2.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036 (eq. 17, tau = beta). The paper uses summed log-ratios
    (`loss.ipo_normalize = false`); with `loss.ipo_normalize = true` (default, as TRL) h uses
    per-token log-ratios (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r (with `loss.f_divergence`,
    the f'(u) of the summed log-ratios are divided by the token counts, as TRL does).
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r) (summed, whatever `ipo_normalize`).
    """
    chosen, rejected = _logratios(logps)
    scored_chosen, scored_rejected = _f_scores(chosen, rejected, cfg)
    if cfg.ipo_normalize:
        h = _per_token_difference(scored_chosen, scored_rejected, logps)
    else:
        h = scored_chosen - scored_rejected
    losses = (h - 1 / (2 * cfg.beta)) ** 2
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


@register("hinge", needs_reference=True, f_divergence_ok=True)
def hinge_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SLiC hinge: relu(1 - beta h).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425. The paper's calibration loss max(0, delta - log p(y_c) + log p(y_r)) has no
    reference model; this is TRL's form, on reference log-ratios with margin delta = 1 / beta
    (scaled by beta).
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    losses = torch.relu(1 - cfg.beta * _f_margin(chosen, rejected, cfg))
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


@register("robust", needs_reference=True, f_divergence_ok=True)
def robust_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """Robust DPO: (-(1 - ls) log sigmoid(beta h) + ls log sigmoid(-beta h)) / (1 - 2 ls).

    Chowdhury, Kini, Natarajan 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", arXiv:2403.00409. An unbiased estimate of the clean DPO loss under label-flip
    rate ls (needs ls < 0.5); equals DPO at ls = 0.
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    z, ls = cfg.beta * _f_margin(chosen, rejected, cfg), cfg.label_smoothing
    losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


@register("exo_pair", needs_reference=True, f_divergence_ok=True)
def exo_pair_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """EXO (pairwise): KL(p_theta || p_target) between two-outcome distributions.

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856 (eq. 16), in TRL's form:
    sigmoid(beta h) (log sigmoid(beta h) - log(1 - eps))
    + sigmoid(-beta h) (log sigmoid(-beta h) - log eps), eps = ls, or 1e-3 when ls = 0.
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    z = cfg.beta * _f_margin(chosen, rejected, cfg)
    eps = cfg.label_smoothing if cfg.label_smoothing > 0 else 1e-3
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


@register("nca_pair", needs_reference=True)
def nca_pair_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """NCA (pairwise): -log sigmoid(r_c) - 0.5 log sigmoid(-r_c) - 0.5 log sigmoid(-r_r).

    Chen, Zhou, Wang, Zhu 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369. r = beta (pi - ref).
    Rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    r_c, r_r = cfg.beta * chosen, cfg.beta * rejected
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return _output(losses, r_c, r_r)


def _bco(logps: PreferenceLogps, cfg: LossConfig, delta: Tensor | float) -> LossOutput:
    """-log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta)), r = beta (pi - ref)."""
    chosen, rejected = _logratios(logps)
    r_c, r_r = cfg.beta * chosen, cfg.beta * rejected
    losses = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    return _output(losses, r_c, r_r)


@register("bco_pair", needs_reference=True)
def bco_pair_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """BCO (pairwise) without reward shift: -log sigmoid(r_c) - log sigmoid(-r_r).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656, as TRL 1.16's DPOTrainer `bco_pair` (and MPO's mix): the binary
    classifier's loss with delta = 0, pair-separable. The paper's running reward shift is `bco`;
    a shift by the step's own mean reward is `bco_batch`.
    Rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r).
    """
    return _bco(logps, cfg, 0.0)


@register("sppo_hard", needs_reference=True)
def sppo_hard_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SPPO with hard labels: (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675: the squared loss of Algorithm 1 with the win probability set to 1 for
    chosen and 0 for rejected (TRL's `sppo_hard`; the paper estimates it softly with PairRM),
    eta = 1 / beta, a = pi_c - ref_c, b = pi_r - ref_r.
    Rewards: beta a, beta b.
    """
    a, b = _logratios(logps)
    losses = (a - 1 / (2 * cfg.beta)) ** 2 + (b + 1 / (2 * cfg.beta)) ** 2
    return _output(losses, cfg.beta * a, cfg.beta * b)


@register("apo_zero", needs_reference=True)
def apo_zero_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """APO-zero: (1 - sigmoid(r_c)) + sigmoid(r_r); raises chosen, lowers rejected likelihood.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment", arXiv:2408.06266. r = beta (pi - ref).
    Rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    r_c, r_r = cfg.beta * chosen, cfg.beta * rejected
    return _output(torch.sigmoid(-r_c) + torch.sigmoid(r_r), r_c, r_r)


@register("apo_down", needs_reference=True)
def apo_down_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """APO-down: sigmoid(r_c) + (1 - sigmoid(r_c - r_r)); lowers both, rejected more.

    D'Oosterlinck et al. 2024, arXiv:2408.06266 (eq. 8). r = beta (pi - ref).
    Rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    r_c, r_r = cfg.beta * chosen, cfg.beta * rejected
    return _output(torch.sigmoid(r_c) + torch.sigmoid(r_r - r_c), r_c, r_r)


# exp(-z) sigmoid(z / tau) = exp(-z + log sigmoid(z / tau)) <= 1 for tau <= 1; for tau > 1 it
# grows without bound as z -> -inf, and the exponent is capped here to keep float32 finite.
_DISCOPOP_MAX_EXPONENT = 50.0


@register("discopop", needs_reference=True, f_divergence_ok=True)
def discopop_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): with z = beta h and m = sigmoid(z / tau),
    (1 - m) * (-log sigmoid(z)) + m * exp(-z).

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models", arXiv:2406.08414 (eq. 5), tau = `loss.discopop_tau`; same as TRL.
    m exp(-z) is computed as exp(-z + log sigmoid(z / tau)), which is exact and cannot overflow
    for tau <= 1; for tau > 1 its exponent is capped at 50 (the loss is then ~5e21 and its
    gradient zero), which only very negative z reach.
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    chosen, rejected = _logratios(logps)
    z, tau = cfg.beta * _f_margin(chosen, rejected, cfg), cfg.discopop_tau
    logistic = -F.logsigmoid(z) * torch.sigmoid(-z / tau)
    exponential = torch.exp((F.logsigmoid(z / tau) - z).clamp(max=_DISCOPOP_MAX_EXPONENT))
    return _output(logistic + exponential, cfg.beta * chosen, cfg.beta * rejected)


@register("cal_dpo", needs_reference=True)
def cal_dpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """Cal-DPO: -log sigmoid(a - b) + ((a - 1/(2 beta))^2 + (b + 1/(2 beta))^2) / 2,
    a = pi_c - ref_c, b = pi_r - ref_r.

    Xiao, Yuan, Zhu, Li, Honavar 2024, "Cal-DPO: Calibrated Direct Preference Optimization for
    Language Model Alignment", arXiv:2412.14516, in the form of its reference code
    (tengxiao1/Cal-DPO scripts/dpo_trainer.py, loss_type "Cal-DPO"): no beta inside the sigmoid,
    the squared calibration terms (log-ratios pulled to +-1/(2 beta)) weighted 1/2. That code adds
    each squared term's batch mean (F.mse_loss) to every pair; per-pair squares have the same
    batch mean and do not depend on how the global batch is split.
    Rewards: beta a, beta b (the reference code logs the policy's log-probs instead).
    """
    a, b = _logratios(logps)
    target = 1 / (2 * cfg.beta)
    losses = -F.logsigmoid(a - b) + 0.5 * ((a - target) ** 2 + (b + target) ** 2)
    return _output(losses, cfg.beta * a, cfg.beta * b)


def _token_kl(logps: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """TDPO's sequential KL sums (chosen, rejected) of the policy from the live reference."""
    if logps.chosen_token_kl is None or logps.rejected_token_kl is None:
        raise ValueError("this loss needs token-level KL sums (chosen_token_kl, rejected_token_kl)")
    return logps.chosen_token_kl, logps.rejected_token_kl


def _tdpo(logps: PreferenceLogps, cfg: LossConfig, kl_term: Callable[[Tensor, Tensor], Tensor]) -> LossOutput:
    """-log sigmoid(beta (h - kl_term(D_c, D_r))), rewards beta (log-ratio + D) (the code's)."""
    chosen, rejected = _logratios(logps)
    kl_c, kl_r = _token_kl(logps)
    losses = -F.logsigmoid(cfg.beta * ((chosen - rejected) - kl_term(kl_c, kl_r)))
    extras = {"token_kl/chosen": kl_c, "token_kl/rejected": kl_r}
    return _output(losses, cfg.beta * (chosen + kl_c), cfg.beta * (rejected + kl_r), extras)


@register("tdpo1", needs_reference=True, needs_token_kl=True)
def tdpo1_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """TDPO1: -log sigmoid(beta (h - (D_r - D_c))), D_c, D_r the sequential KL divergences
    sum_t KL(ref(. | x, y<t) || pi(. | x, y<t)) over the chosen and rejected completions.

    Zeng, Liu, Ma, Yang, Zhang, Wang 2024, "Token-level Direct Preference Optimization",
    arXiv:2404.11999, eq. 19, as its reference code (Vance0124/Token-level-Direct-Preference-
    Optimization, trainers.py `tdpo_loss`, if_tdpo2=False). The gradient flows through both KLs.
    Rewards: beta (pi_c - ref_c + D_c), beta (pi_r - ref_r + D_r) (the code's).
    """
    return _tdpo(logps, cfg, lambda kl_c, kl_r: kl_r - kl_c)


@register("tdpo", needs_reference=True, needs_token_kl=True)
def tdpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """TDPO2: -log sigmoid(beta (h - alpha (D_r - sg(D_c)))), alpha = `loss.tdpo_alpha`, sg a
    stop-gradient, D_c, D_r as in `tdpo1_loss`.

    Zeng et al. 2024, arXiv:2404.11999, eq. 21 (the paper's recommended form, its code's default
    if_tdpo2=True, alpha 0.5). Rewards as `tdpo1_loss`.
    """
    return _tdpo(logps, cfg, lambda kl_c, kl_r: cfg.tdpo_alpha * (kl_r - kl_c.detach()))


# ----------------------------------------------------------------------------------------------
# Batch-coupled losses: defined over the optimizer step's global batch (`BatchContext`)


def whole_batch(logps: PreferenceLogps, cfg: LossConfig, step_stats: StepStats) -> BatchContext:
    """The context of a batch that is the whole global batch (single-batch calls, evaluation):
    `step_stats` of its detached tensors without running state."""
    detached = replace(logps, **{k: v.detach() for k, v in vars(logps).items() if v is not None})
    stats, _ = step_stats(detached, cfg, None)
    return BatchContext(stats, torch.arange(len(logps.chosen_logps), device=logps.chosen_logps.device))


def valid_batch(logps: PreferenceLogps, cfg: LossConfig, valid: Tensor) -> BatchContext:
    """The context of an evaluation batch, taken as a whole batch: `step_stats` of its valid
    pairs (`valid` [B] bool; padding pairs excluded, as in training) without running state.
    One host read (which pairs are valid); a batch of padding pairs only uses them all."""
    keep = torch.nonzero(valid).squeeze(1)
    if not len(keep):
        keep = torch.arange(len(valid), device=valid.device)
    detached = replace(logps, **{k: v.detach()[keep] for k, v in vars(logps).items() if v is not None})
    stats, _ = step_stats(detached, cfg, None)
    return BatchContext(stats, (torch.cumsum(valid.long(), 0) - 1).clamp(min=0))


def _sorted_partners(values: Tensor, partners: Tensor) -> Tensor:
    """For each i, the partner of the same rank: sort(partners)[rank of values[i] in values]."""
    out = torch.empty_like(partners)
    out[torch.argsort(values, stable=True)] = torch.sort(partners, stable=True).values
    return out


def _aot_stats(logps: PreferenceLogps, cfg: LossConfig, state: dict | None) -> tuple[dict, dict]:
    """AOT paired: each pair's reference margin ref_c - ref_r of the same rank."""
    _logratios(logps)  # the reference is there
    policy = logps.chosen_logps - logps.rejected_logps
    ref = logps.ref_chosen_logps - logps.ref_rejected_logps
    return {"aot/ref_margin": _sorted_partners(policy, ref)}, {}


@register("aot", needs_reference=True, step_stats=_aot_stats)
def aot_loss(logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None) -> LossOutput:
    """AOT (paired): -(1 - ls) log sigmoid(beta d_k) - ls log sigmoid(-beta d_k), d_k the k-th
    smallest policy margin pi_c - pi_r minus the k-th smallest reference margin ref_c - ref_r of
    the optimizer step's global batch.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882, in TRL's form (DPOTrainer `aot`: sorted over its batch). Each pair carries
    the term of its policy margin's rank k (the sum over pairs is the sum over k); the partner
    reference margin is a constant, so gradients are the sort's. The sort is over the global batch
    gathered across ranks and micro-batches (`BatchContext`), not one micro-batch as TRL's.
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    context = context or whole_batch(logps, cfg, _aot_stats)
    chosen, rejected = _logratios(logps)
    margin = logps.chosen_logps - logps.rejected_logps
    delta = margin - context.stats["aot/ref_margin"][context.position]
    return _output(
        _sigmoid_loss(cfg.beta * delta, cfg.label_smoothing), cfg.beta * chosen, cfg.beta * rejected
    )


def _aot_unpaired_stats(logps: PreferenceLogps, cfg: LossConfig, state: dict | None) -> tuple[dict, dict]:
    """AOT unpaired: each chosen log-ratio's rejected log-ratio of the same rank, and back."""
    chosen, rejected = _logratios(logps)
    stats = {
        "aot/rejected_partner": _sorted_partners(chosen, rejected),
        "aot/chosen_partner": _sorted_partners(rejected, chosen),
    }
    return stats, {}


@register("aot_unpaired", needs_reference=True, step_stats=_aot_unpaired_stats)
def aot_unpaired_loss(
    logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None
) -> LossOutput:
    """AOT (unpaired): -(1 - ls) log sigmoid(beta d_k) - ls log sigmoid(-beta d_k), d_k the k-th
    smallest chosen log-ratio pi_c - ref_c minus the k-th smallest rejected log-ratio
    pi_r - ref_r of the optimizer step's global batch.

    Melnyk et al. 2024, arXiv:2406.05882, in TRL's form (DPOTrainer `aot_unpaired`). A term
    couples the chosen side of one pair with the rejected side of another: each pair carries the
    term of its chosen log-ratio's rank (its value and chosen gradient), plus the rejected
    gradient of the term of its rejected log-ratio's rank (a zero-valued term), so the sum over
    pairs equals the sum over k in value and gradient (`BatchContext` over the global batch).
    Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    """
    context = context or whole_batch(logps, cfg, _aot_unpaired_stats)
    chosen, rejected = _logratios(logps)
    at = context.position

    def term(c: Tensor, r: Tensor) -> Tensor:
        return _sigmoid_loss(cfg.beta * (c - r), cfg.label_smoothing)

    own_chosen = term(chosen, context.stats["aot/rejected_partner"][at])
    own_rejected = term(context.stats["aot/chosen_partner"][at], rejected)
    losses = own_chosen + (own_rejected - own_rejected.detach())
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


def _mean_reward(logps: PreferenceLogps, cfg: LossConfig) -> Tensor:
    """The mean of the 2N rewards beta (pi - ref) of the chosen and rejected completions."""
    chosen, rejected = _logratios(logps)
    return cfg.beta * torch.cat([chosen, rejected]).mean()


def _bco_batch_stats(logps: PreferenceLogps, cfg: LossConfig, state: dict | None) -> tuple[dict, dict]:
    return {"bco/delta": _mean_reward(logps, cfg)}, {}


@register("bco_batch", needs_reference=True, step_stats=_bco_batch_stats)
def bco_batch_loss(
    logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None
) -> LossOutput:
    """BCO (pairwise) shifted by the step's mean reward: -log sigmoid(r_c - delta)
    - log sigmoid(-(r_r - delta)), delta = the mean of the 2N detached rewards r_c, r_r of the
    optimizer step's global batch (fsdpo's `bco_pair` before it became TRL's; that took one
    micro-batch's mean, padding pairs included). Jung et al. 2024, arXiv:2404.04656.
    Rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r).
    """
    context = context or whole_batch(logps, cfg, _bco_batch_stats)
    return _bco(logps, cfg, context.stats["bco/delta"])


def _bco_running_stats(logps: PreferenceLogps, cfg: LossConfig, state: dict | None) -> tuple[dict, dict]:
    """The running mean of the steps' mean rewards, this step's included; state: "bco/steps",
    "bco/mean" (float64)."""
    batch = _mean_reward(logps, cfg)
    if state is None:
        return {"bco/delta": batch}, {}
    steps = state.get("bco/steps", torch.zeros((), dtype=torch.float64, device=batch.device)) + 1
    before = state.get("bco/mean", torch.zeros((), dtype=torch.float64, device=batch.device))
    mean = before + (batch.double() - before) / steps
    return {"bco/delta": mean.to(batch.dtype)}, {"bco/steps": steps, "bco/mean": mean}


@register("bco", needs_reference=True, step_stats=_bco_running_stats)
def bco_loss(logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None) -> LossOutput:
    """BCO (pairwise) with the paper's reward shift: -log sigmoid(r_c - delta)
    - log sigmoid(-(r_r - delta)), delta the running mean of the rewards.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656 (the reward shift delta): delta_t = (m_1 + ... + m_t) / t, m_s the mean of the 2N detached
    rewards r_c, r_r of step s's global batch, updated before step t's loss as TRL's former
    BCOTrainer (RunningMoments over each step's mean). Its state is checkpointed; a skipped step
    leaves it unchanged. Without a context (evaluation, single batches) delta is the batch's
    own mean.
    Rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r).
    """
    context = context or whole_batch(logps, cfg, _bco_running_stats)
    return _bco(logps, cfg, context.stats["bco/delta"])


BETA_DPO_NOISE_NATS = 1e-3  # below this spread of the margins beta-DPO samples uniformly


def _beta_dpo_stats(logps: PreferenceLogps, cfg: LossConfig, state: dict | None) -> tuple[dict, dict]:
    """beta-DPO's step statistics: the running mean and std of the margins h (momentum
    `beta_dpo_momentum` from 0, this step's included, as its code; the batch's own without
    state), the kept pairs (Gumbel top-k: sampling without replacement proportional to
    exp(-z^2 / 2), z = (h - mean) / std) and the batch beta. Its RNG is seeded by the count of
    steps drawn ("beta_dpo/draws", on the host).

    z divides by max(std, `BETA_DPO_NOISE_NATS`): margins spread less than that are fp32 noise,
    not preference. At the first step the policy is its reference, and h is 0 only where both were
    summed in the same order; a reference scored in another layout or rank split leaves h ~ 1e-7
    nats, whose z-scores (the running std then being 0.1 x theirs) would pick the kept pairs by
    rounding. With the floor they are picked uniformly, as for h = 0 exactly."""
    chosen, rejected = _logratios(logps)
    gap = (chosen - rejected).double()
    count = len(gap)
    keep = max(int(count * (1 - cfg.beta_dpo_filter)), 1)
    zero = torch.zeros((), dtype=torch.float64, device=gap.device)
    g = 0.0 if state is None else cfg.beta_dpo_momentum
    state = state or {}
    mean = g * state.get("beta_dpo/gap_mean", zero) + (1 - g) * gap.mean()
    std = g * state.get("beta_dpo/gap_std", zero) + (1 - g) * gap.std()
    draws = int(state.get("beta_dpo/draws", 0))
    log_weight = -0.5 * ((gap - mean) / std.clamp(min=BETA_DPO_NOISE_NATS)) ** 2
    generator = torch.Generator(device=gap.device).manual_seed(draws)
    uniform = torch.rand(count, generator=generator, device=gap.device, dtype=torch.float64)
    kept = torch.topk(log_weight - torch.log(-torch.log(uniform)), keep).indices
    weight = torch.zeros_like(gap)
    weight[kept] = count / keep  # the mean over the kept pairs, as a sum over all / count
    beta = (cfg.beta * (1 + cfg.beta_dpo_alpha * (gap[kept].mean() - mean))).clamp(min=1e-3)
    stats = {"beta_dpo/beta": beta.to(chosen.dtype), "beta_dpo/weight": weight.to(chosen.dtype)}
    after = {"beta_dpo/gap_mean": mean, "beta_dpo/gap_std": std, "beta_dpo/draws": torch.tensor(draws + 1)}
    return stats, after


@register("beta_dpo", needs_reference=True, step_stats=_beta_dpo_stats)
def beta_dpo_loss(logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None) -> LossOutput:
    """beta-DPO: -log sigmoid(beta_b h), averaged over the step's kept pairs, beta_b =
    max(beta (1 + a (mean kept h - M)), 1e-3) detached, a = `loss.beta_dpo_alpha`.

    Wu et al. 2024, "beta-DPO: Direct Preference Optimization with Dynamic beta",
    arXiv:2407.08639, in the form of its code (junkangwu/beta-DPO `preference_loss`): M and S the
    running mean and std of the margins h = (pi_c - ref_c) - (pi_r - ref_r), a fraction
    `loss.beta_dpo_filter` of the pairs left out by sampling (`_beta_dpo_stats`). The code updates
    its statistics per micro-batch; here once per optimizer step over the global batch
    (checkpointed with the RNG's draw count; a skipped step leaves them). Without a context M, S
    are the batch's own. Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    Extras: "beta_dpo/beta" = beta_b, "beta_dpo/kept" = 1 for kept pairs, else 0.
    """
    context = context or whole_batch(logps, cfg, _beta_dpo_stats)
    chosen, rejected = _logratios(logps)
    beta, weight = context.stats["beta_dpo/beta"], context.stats["beta_dpo/weight"][context.position]
    losses = -weight * F.logsigmoid(beta * (chosen - rejected))
    extras = {"beta_dpo/beta": beta.expand_as(losses), "beta_dpo/kept": (weight > 0).to(losses.dtype)}
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected, extras)


def _kto_stats(logps: PreferenceLogps, cfg: LossConfig, state: dict | None) -> tuple[dict, dict]:
    """KTO's z0: max(0, mean of the KL sequences' log-ratios pi_KL - ref_KL) of the batch."""
    _, kl = _logratios(logps)
    return {"kto/z0": kl.mean().clamp(min=0)}, {}


def _by_label(logps: PreferenceLogps, cfg: LossConfig, desirable: Tensor, undesirable: Tensor) -> Tensor:
    """An unpaired loss per example: lambda_D `desirable` for a desirable one, lambda_U
    `undesirable` for an undesirable one (`kto_desirable_weight`, `kto_undesirable_weight`)."""
    if logps.desirable is None:
        raise ValueError("an unpaired loss needs unpaired examples (PreferenceLogps.desirable)")
    return torch.where(
        logps.desirable > 0, cfg.kto_desirable_weight * desirable, cfg.kto_undesirable_weight * undesirable
    )


@register(
    "kto", needs_reference=True, ld_weighted=False, step_stats=_kto_stats, unpaired=True, kl_sequences=True
)
def kto_loss(logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None) -> LossOutput:
    """KTO: lambda_D (1 - sigmoid(beta (r - z0))) for a desirable example, lambda_U (1 - sigmoid(
    beta (z0 - r))) for an undesirable one, r = pi - ref of its completion (pi_c - ref_c here),
    z0 = max(0, mean over the optimizer step's global batch of pi_KL - ref_KL), detached.

    Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", arXiv:2402.01306 (eq. 8, the loss in its 1 - v form; z0 clamped at 0
    as its code and TRL 1.16's KTOTrainer). lambda_D = `loss.kto_desirable_weight`, lambda_U =
    `loss.kto_undesirable_weight`. Each "pair" is an example: its completion on the chosen side,
    its KL completion (another example's completion after its prompt, `data.kl_shift_chunk`) on
    the rejected side (pi_r, ref_r = pi_KL, ref_KL), `PreferenceLogps.desirable` its label. z0
    is over every rank's and micro-batch's examples (`BatchContext`): TRL takes one micro-batch's
    mean, averaged across ranks (TRL #2153, PR #6335), the same with one micro-batch per step.
    Normalisation: the sum over the global batch's examples divided by their count, as TRL's
    per-micro-batch mean averaged over accumulation steps (equal micro-batches). At z0 = 0 and
    pi = ref each example's loss is lambda / 2 (not ln 2). Without a context z0 is the batch's.
    Rewards: beta r (`engine.metrics.PairMetrics` averages them over the desirable and the
    undesirable examples apart). Extras: "kl" = z0 (TRL's name).
    """
    context = context or whole_batch(logps, cfg, _kto_stats)
    r, _ = _logratios(logps)
    z0 = context.stats["kto/z0"]
    losses = _by_label(logps, cfg, torch.sigmoid(-cfg.beta * (r - z0)), torch.sigmoid(-cfg.beta * (z0 - r)))
    return _output(losses, cfg.beta * r, cfg.beta * r, {"kl": z0.expand_as(losses)})


@register("apo_zero_unpaired", needs_reference=True, ld_weighted=False, unpaired=True)
def apo_zero_unpaired_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """APO-zero on unpaired examples: lambda_D (1 - sigmoid(beta r)) for a desirable example
    (raises its likelihood), lambda_U sigmoid(beta r) for an undesirable one (lowers it), r = pi -
    ref of its completion; APO-zero's two terms (`apo_zero`) split over the examples.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions:
    Addressing Underspecification in Alignment", arXiv:2408.06266, unpaired as TRL 1.16's
    KTOTrainer `loss_type="apo_zero_unpaired"` (the same weights lambda_D, lambda_U as `kto`). No
    KL term: the examples have no KL sequences (`kl_sequences`). Pair-separable, normalised as
    `kto`. At init each example's loss is lambda / 2. Rewards: beta r.
    """
    r, _ = _logratios(logps)
    losses = _by_label(logps, cfg, torch.sigmoid(-cfg.beta * r), torch.sigmoid(cfg.beta * r))
    return _output(losses, cfg.beta * r, cfg.beta * r)


class LossState:
    """The running state of the batch-coupled losses (`step_stats`) by name, saved in the
    checkpoints' trainer_state.json (`state_dict`: exact values): 0-d float64 tensors on `device`,
    0-d int64 tensors on the host (counters such as RNG draws)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, float | int]:
        return {name: value.item() for name, value in self.values.items()}

    def load_state_dict(self, saved: dict[str, float | int]) -> None:
        self.values = {
            name: torch.tensor(value)
            if isinstance(value, int)
            else torch.tensor(value, dtype=torch.float64, device=self.device)
            for name, value in saved.items()
        }


# ----------------------------------------------------------------------------------------------
# Reference-free losses


@register("simpo", needs_reference=False)
def simpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SimPO: -(1 - ls) log sigmoid(u) - ls log sigmoid(-u), u = beta (pi_c/n_c - pi_r/n_r) - gamma.

    Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734. gamma = `loss.gamma_beta_ratio` * beta. The paper's formula has no label
    smoothing; ls follows its released trainer and TRL (ls = 0 is the paper's loss).
    AlphaPO: with a = `loss.alphapo_alpha` != 0 each length-normalised reward s = pi / n becomes
    (1 - p^-a) / a, p = exp(s) (Gupta et al. 2025, "AlphaPO: Reward Shape Matters for LLM
    Alignment", arXiv:2501.03884, eq. 6; TRL's CPOTrainer `alpha` with loss_type "simpo"), its
    exponent -a s capped at 40 (`_power_shape`); a = 0 is SimPO.
    Rewards: beta pi_c / n_c, beta pi_r / n_r (the length-normalised reward, no margin; the
    AlphaPO reward with a != 0).
    """
    chosen = _power_shape(_per_token(logps.chosen_logps, logps.chosen_tokens), cfg.alphapo_alpha)
    rejected = _power_shape(_per_token(logps.rejected_logps, logps.rejected_tokens), cfg.alphapo_alpha)
    gamma = cfg.gamma_beta_ratio * cfg.beta
    losses = _sigmoid_loss(cfg.beta * (chosen - rejected) - gamma, cfg.label_smoothing)
    return _output(losses, cfg.beta * chosen, cfg.beta * rejected)


@register("sft", needs_reference=False, ld_weighted=False, f_divergence_ok=True)
def sft_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """SFT: negative log-likelihood of the chosen completion per token, -pi_c / n_c (the true
    log-likelihood whatever `loss.ld_alpha`, as TRL's `sft`).

    Combined with DPO as ["dpo", "sft"] this is RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv:2404.19733).
    Rewards: beta pi_c / n_c, beta pi_r / n_r (SimPO's reference-free reward, for monitoring
    only; `compute_loss` reports another loss's rewards when sft is combined).
    """
    chosen = _per_token(logps.chosen_logps, logps.chosen_tokens)
    rejected = _per_token(logps.rejected_logps, logps.rejected_tokens)
    return _output(-chosen, cfg.beta * chosen, cfg.beta * rejected)


@register("cpo", needs_reference=False, ld_weighted=False)
def cpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """CPO: -(1 - ls) log sigmoid(beta (r_c - r_r)) - ls log sigmoid(-beta (r_c - r_r))
    + cpo_alpha (-pi_c / n_c), with the summed log-probs as rewards r = pi.

    Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", arXiv:2401.08417 (eq. 3 plus the NLL of eq. 4), as
    TRL's CPOTrainer with loss_type "sigmoid": label smoothing as TRL's (ls = 0 is the paper's),
    the NLL weighted by `loss.cpo_alpha`. With a = `loss.alphapo_alpha` != 0, r = (1 - p^-a) / a of
    p = exp(pi), as TRL applies AlphaPO to every CPO type (p^-a = exp(-a pi) overflows for long
    completions: its exponent is capped at 40; AlphaPO's paper uses `simpo`). CPO-SimPO is
    ["simpo", "sft"] with weights [1, cpo_alpha]. The NLL is each pair's mean over its chosen
    tokens (TRL: the token mean over the batch's chosen completions, the same for equal lengths).
    LD-DPO's `loss.ld_alpha` does not apply (the NLL is the true likelihood).
    Rewards: beta r_c, beta r_r. Extras: "nll_loss" = -pi_c / n_c (TRL's name).
    """
    reward_chosen = _power_shape(logps.chosen_logps, cfg.alphapo_alpha)
    reward_rejected = _power_shape(logps.rejected_logps, cfg.alphapo_alpha)
    preference = _sigmoid_loss(cfg.beta * (reward_chosen - reward_rejected), cfg.label_smoothing)
    nll = -_per_token(logps.chosen_logps, logps.chosen_tokens)
    losses = preference + cfg.cpo_alpha * nll
    return _output(losses, cfg.beta * reward_chosen, cfg.beta * reward_rejected, {"nll_loss": nll})


# The largest float32 below 1 is 1 - 2^-24: ORPO's mean log-probs are capped at its log, so a
# completion the policy is certain of (mean log-prob 0, also a pair without tokens) has finite
# log-odds (at most ~16.6 per side) and gradients instead of log(1 - 1) = -inf.
_ORPO_MAX_MEAN_LOGP = math.log1p(-(2.0**-24))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 without catastrophic cancellation: log(-expm1(x)) above -ln 2,
    log1p(-exp(x)) below (Maechler 2012, "Accurately Computing log(1 - exp(-|a|))")."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register("orpo", needs_reference=False, ld_weighted=False)
def orpo_loss(logps: PreferenceLogps, cfg: LossConfig) -> LossOutput:
    """ORPO: -pi_c / n_c - lambda log sigmoid(log odds(y_c) - log odds(y_r)), with
    odds(y) = p / (1 - p) of the length-normalised likelihood p = exp(s), s = pi / n.

    Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691 (eq. 6-7), lambda = `loss.orpo_lambda` (TRL's ORPOConfig `beta`). log odds =
    s - log(1 - exp(s)) is computed in float32 or wider with a stable log1mexp (TRL #1473 and
    PR #4763: log1p(-exp(s)) cancels catastrophically as s -> 0), s capped at log(1 - 2^-24).
    The NLL is each pair's mean over its chosen completion tokens; the paper's code and TRL's
    ORPOTrainer take one token mean over the batch's chosen sequences, prompt tokens included.
    LD-DPO's `loss.ld_alpha` does not apply (the NLL is the true likelihood).
    Rewards: beta pi_c / n_c, beta pi_r / n_r (TRL's, with its beta = lambda). Extras (TRL's
    names): "nll_loss" = -pi_c / n_c, "log_odds_ratio" = the log sigmoid term, "log_odds_chosen"
    = the log-odds difference.
    """
    dtype = torch.promote_types(logps.chosen_logps.dtype, torch.float32)
    chosen = _per_token(logps.chosen_logps.to(dtype), logps.chosen_tokens)
    rejected = _per_token(logps.rejected_logps.to(dtype), logps.rejected_tokens)
    capped_chosen = chosen.clamp(max=_ORPO_MAX_MEAN_LOGP)
    capped_rejected = rejected.clamp(max=_ORPO_MAX_MEAN_LOGP)
    log_odds = (capped_chosen - capped_rejected) - (_log1mexp(capped_chosen) - _log1mexp(capped_rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    extras = {"nll_loss": nll, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
    return _output(nll - cfg.orpo_lambda * ratio, cfg.beta * chosen, cfg.beta * rejected, extras)


# ----------------------------------------------------------------------------------------------
# Entry points


def loss_names(cfg: LossConfig) -> list[str]:
    """The loss names of `cfg.type` as a list."""
    return [cfg.type] if isinstance(cfg.type, str) else list(cfg.type)


# read by every loss (beta) or checked apart (the list of losses, f-DPO, LD-DPO)
_SETTINGS_OF_EVERY_LOSS = {"type", "weights", "beta", "f_divergence", "f_alpha", "ld_alpha", "ld_sides"}


def _known_names(cfg: LossConfig) -> list[str] | None:
    """`cfg.type`'s names, or None when one is not registered (engine.recipe reports it)."""
    names = loss_names(cfg)
    return names if all(name in LOSSES for name in names) else None


def check_settings(cfg: LossConfig, problems: Problems) -> None:
    """Records in `problems` the `[loss]` settings the losses of `cfg.type` cannot take: a
    `loss.f_divergence` other than reverse_kl needs every loss registered `f_divergence_ok`, as
    TRL's DPOTrainer requires (f-DPO's log Z(x) term cancels only in the
    chosen-minus-rejected difference). Unknown names are left to engine.recipe's check."""
    names = _known_names(cfg)
    if names is None:
        return
    problems.require(
        len({LOSSES[name].unpaired for name in names}) == 1,
        f"loss.type: {names} mixes unpaired losses "
        f"({', '.join(n for n in names if LOSSES[n].unpaired)}) with paired ones: they take different data",
        "loss.type",
    )
    if cfg.f_divergence != "reverse_kl":
        others = [name for name in names if not LOSSES[name].f_divergence_ok]
        takers = ", ".join(name for name, spec in LOSSES.items() if spec.f_divergence_ok)
        problems.require(
            not others,
            f'loss.f_divergence: "{cfg.f_divergence}" applies to {takers}; not to {", ".join(others)} '
            'in loss.type (use "reverse_kl" with it)',
            "loss.f_divergence",
            "loss.type",
        )


def check_read_settings(cfg: LossConfig, problems: Problems) -> None:
    """Records in `problems` each `[loss]` setting changed from its default that no loss of
    `cfg.type` reads (its function's `cfg.<field>`, `LossSpec.reads`; LD-DPO's an `ld_weighted`
    loss, `f_alpha` the alpha divergence): a recipe's setting is never silently ignored. The
    recipe's check (engine.recipe), not the loss API, which takes one config for many losses."""
    names = _known_names(cfg)
    if names is None:
        return
    defaults = LossConfig()
    own = {f.name for f in dataclasses.fields(LossConfig)} - _SETTINGS_OF_EVERY_LOSS
    readers = {key: [n for n, spec in LOSSES.items() if key in spec.reads] for key in sorted(own)}
    ld = [n for n, spec in LOSSES.items() if spec.ld_weighted]
    readers |= {"ld_alpha": ld, "ld_sides": ld if cfg.ld_alpha != 1 else []}
    readers["f_alpha"] = names if cfg.f_divergence == "alpha_divergence" else []
    for key, takers in readers.items():
        value = getattr(cfg, key)
        already = any(k == f"loss.{key}" for k, _ in problems.found)  # out of range, say that alone
        if value == getattr(defaults, key) or any(n in takers for n in names) or already:
            continue
        needs = (
            f"a loss that reads it ({', '.join(takers)})"
            if takers
            else 'loss.f_divergence = "alpha_divergence"'
        )
        if key == "ld_sides":
            needs = "loss.ld_alpha below 1"
        problems.require(
            False,
            f"loss.{key}={value!r} changes nothing for loss.type {names}: it needs {needs}",
            f"loss.{key}",
            "loss.type",
        )


def _specs(cfg: LossConfig) -> list[LossSpec]:
    specs = []
    for name in loss_names(cfg):
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSSES)}")
        specs.append(LOSSES[name])
    problems = Problems()
    check_settings(cfg, problems)
    if problems.found:
        raise UserError(*(message for _, message in problems.found))
    return specs


def needs_reference(cfg: LossConfig) -> bool:
    """Whether any loss in `cfg.type` needs reference log-probs."""
    return any(spec.needs_reference for spec in _specs(cfg))


def needs_token_kl(cfg: LossConfig) -> bool:
    """Whether any loss in `cfg.type` needs TDPO's token-level KL sums (a live reference)."""
    return any(spec.needs_token_kl for spec in _specs(cfg))


def check_reference_mode(cfg: LossConfig, mode: str, problems: Problems) -> None:
    """Records in `problems` a `reference.mode` the losses of `cfg.type` cannot use: a live
    reference for reference-free losses only (nothing would read it), a cached one for a loss
    that needs the token-level KL (the reference's whole next-token distributions)."""
    names = _known_names(cfg)
    if names is None:
        return
    specs = [LOSSES[name] for name in names]
    problems.require(
        mode != "live" or any(spec.needs_reference for spec in specs),
        f'reference.mode = "live": loss.type {names} uses no reference; leave it "cached"',
        "reference.mode",
        "loss.type",
    )
    kl = [name for name, spec in zip(names, specs) if spec.needs_token_kl]
    problems.require(
        mode == "live" or not kl,
        f"loss.type {kl}: the token-level KL needs the reference's next-token distributions, "
        'not cached log-probs; set reference.mode = "live"',
        "reference.mode",
        "loss.type",
    )


def needs_logweights(cfg: LossConfig) -> bool:
    """Whether any loss in `cfg.type` needs WPO log-weights."""
    return any(spec.needs_logweights for spec in _specs(cfg))


def unpaired(cfg: LossConfig) -> bool:
    """Whether the losses of `cfg.type` take unpaired examples (`LossSpec.unpaired`)."""
    return any(spec.unpaired for spec in _specs(cfg))


def kl_sequences(cfg: LossConfig) -> bool:
    """Whether the losses of `cfg.type` read unpaired examples' KL sequences
    (`LossSpec.kl_sequences`)."""
    return any(spec.kl_sequences for spec in _specs(cfg))


def batch_coupled(cfg: LossConfig) -> bool:
    """Whether any loss in `cfg.type` is batch-coupled (needs a `BatchContext` per micro-batch)."""
    return any(spec.step_stats is not None for spec in _specs(cfg))


def step_stats(
    logps: PreferenceLogps, cfg: LossConfig, state: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The `BatchContext.stats` of every batch-coupled loss of `cfg.type` over `logps`, the
    detached [N] tensors of the step's global batch (LD-DPO's desensitised sums for the
    `ld_weighted` ones), and the running state after this step from `state` (None: without
    running state, as `whole_batch`)."""
    desensitized = length_desensitized(logps, cfg) if needs_shared_length(cfg) else logps
    stats, after = {}, dict(state or {})
    for spec in _specs(cfg):
        if spec.step_stats is not None:
            found, changed = spec.step_stats(desensitized if spec.ld_weighted else logps, cfg, state)
            stats |= found
            after |= changed
    return stats, after


def needs_shared_length(cfg: LossConfig) -> bool:
    """Whether the policy's forward must sum log-probs over each pair's shared length (LD-DPO)."""
    return cfg.ld_alpha != 1.0 and any(spec.ld_weighted for spec in _specs(cfg))


def reference_needs_shared_length(cfg: LossConfig) -> bool:
    """Whether the reference log-probs must carry shared-length sums (LD-DPO on both sides)."""
    return needs_shared_length(cfg) and cfg.ld_sides == "both" and needs_reference(cfg)


def length_desensitized(logps: PreferenceLogps, cfg: LossConfig) -> PreferenceLogps:
    """LD-DPO: every summed log-prob s becomes s_l + ld_alpha (s - s_l), s_l its sum over the
    pair's first l = min(n_c, n_r) tokens; the policy's, and with `loss.ld_sides = "both"` (TRL)
    the reference's too (`"policy"`: ms-swift, LLaMA-Factory). `logps` itself at ld_alpha = 1.

    Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411. Combined here at loss time from the totals and the shared-length sums
    (the forward's and the reference cache's), so one cached reference serves every ld_alpha.
    """
    alpha = cfg.ld_alpha
    if alpha == 1.0:
        return logps
    sides = ["chosen", "rejected"]
    if cfg.ld_sides == "both" and logps.ref_chosen_logps is not None:
        sides += ["ref_chosen", "ref_rejected"]
    changed = {}
    for side in sides:
        shared = getattr(logps, f"{side}_shared_logps")
        if shared is None:
            raise ValueError(
                f"loss.ld_alpha < 1 needs {side}_shared_logps (sums over the pair's shared length)"
            )
        changed[f"{side}_logps"] = shared + alpha * (getattr(logps, f"{side}_logps") - shared)
    return replace(logps, **changed)


def compute_loss(logps: PreferenceLogps, cfg: LossConfig, context: BatchContext | None = None) -> LossOutput:
    """Weighted sum of the per-pair losses named in `cfg.type` (weights default to 1.0 each).

    Rewards and extras come from the first loss that is not "sft" (sft's own when it is alone),
    so ["dpo", "sft"] (RPO) reports DPO's implicit rewards. Losses registered `ld_weighted` see
    `length_desensitized(logps, cfg)` (LD-DPO), the others `logps`. Batch-coupled losses get
    `context` (`step_stats` of the global batch); without one, `logps` is the whole batch.
    """
    names, specs = loss_names(cfg), _specs(cfg)
    if not names:
        raise ValueError("loss.type names no loss")
    weights = cfg.weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses {names}")
    desensitized = length_desensitized(logps, cfg) if needs_shared_length(cfg) else logps
    outputs = [
        spec.fn(desensitized if spec.ld_weighted else logps, cfg, *([context] if spec.step_stats else []))
        for spec in specs
    ]
    losses = weights[0] * outputs[0].losses
    for weight, out in zip(weights[1:], outputs[1:]):
        losses = losses + weight * out.losses
    reported = next((out for name, out in zip(names, outputs) if name != "sft"), outputs[0])
    return LossOutput(losses, reported.chosen_rewards, reported.rejected_rewards, reported.extras)
