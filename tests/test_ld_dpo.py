"""LD-DPO's `loss.ld_alpha`: the forward's shared-length sums in every mode against a float64
transcription, the loss against its formula (values and gradients, both `ld_sides`), off at 1,
the reference provider's cache handling, and TRL 1.16's own rule on the same token log-probs."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import DataSource, LossConfig, ModelConfig
from engine.data import PairBatch, build_dataset
from engine.forward import FORWARD_MODES, SequenceLogprobs, policy_logps
from engine.losses import PreferenceLogps, compute_loss, length_desensitized, needs_shared_length
from engine.model import build_tokenizer
from tests.conftest import (
    LN2,
    base_tables,
    every_position_logps,
    main_in_process,
    read_metrics,
    train_rows,
    write_recipe,
)

CPU = torch.device("cpu")
# chosen / rejected lengths: longer chosen, longer rejected, equal, both 1, one of them 1
CHOSEN = (5, 1, 30, 17, 1, 12)
REJECTED = (20, 12, 1, 17, 1, 4)
PROMPTS = (1, 9, 5, 14, 3, 6)


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch() -> PairBatch:
    g = torch.Generator().manual_seed(11)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 416, (n,), generator=g).tolist()

    return PairBatch(
        torch.arange(6),
        torch.ones(6, dtype=torch.bool),
        [tokens(n) for n in PROMPTS],
        [tokens(n) for n in CHOSEN],
        [tokens(n) for n in REJECTED],
    )


def _token_logps64(lm, prompt: list[int], completion: list[int]) -> list[float]:
    """float64 log p of each completion token, from the full logits of prompt + completion."""
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(lm(ids, use_cache=False).logits[0, :-1], dim=-1)
    return logprobs.gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1 :].tolist()


# ----------------------------------------------------------------------------------------------
# The forward's shared-length sums


def test_shared_length_sums_match_float64_transcription_in_every_mode(lm, batch) -> None:
    """Split by hand: shared = the first min(n_c, n_r) tokens' log-probs, total = all of them."""
    lm64 = copy.deepcopy(lm).double()
    expected = {"chosen": ([], []), "rejected": ([], [])}
    with torch.no_grad():
        for prompt, chosen, rejected in zip(batch.prompts, batch.chosen, batch.rejected):
            shared = min(len(chosen), len(rejected))
            for side, completion in (("chosen", chosen), ("rejected", rejected)):
                token_logps = _token_logps64(lm64, prompt, completion)
                expected[side][0].append(math.fsum(token_logps))
                expected[side][1].append(math.fsum(token_logps[:shared]))
    model = SequenceLogprobs(lm, chunk_tokens=7)
    with torch.no_grad():
        for mode, forward in FORWARD_MODES.items():
            out = policy_logps(mode, model, batch, 0, CPU, shared_length=True)
            for side in ("chosen", "rejected"):
                totals, shared = (torch.tensor(v, dtype=torch.float64) for v in expected[side])
                got_total = getattr(out, f"{side}_logps").double()
                got_shared = getattr(out, f"{side}_shared_logps").double()
                torch.testing.assert_close(got_total, totals, rtol=1e-6, atol=1e-5, msg=f"{mode} {side}")
                torch.testing.assert_close(got_shared, shared, rtol=1e-6, atol=1e-5, msg=f"{mode} {side}")
            # the shorter completion's shared sum is its whole sum (the same terms, exactly)
            shorter_c = torch.tensor([c <= r for c, r in zip(CHOSEN, REJECTED)])
            shorter_r = torch.tensor([r <= c for c, r in zip(CHOSEN, REJECTED)])
            assert torch.equal(out.chosen_shared_logps[shorter_c], out.chosen_logps[shorter_c]), mode
            assert torch.equal(out.rejected_shared_logps[shorter_r], out.rejected_logps[shorter_r]), mode
            # off: no flags built, no shared sums, and the totals bitwise as with them
            assert all(x.score_in_shared is None for x in forward.layout(batch, 0, CPU)), mode
            plain = policy_logps(mode, model, batch, 0, CPU)
            assert plain.chosen_shared_logps is None and plain.rejected_shared_logps is None
            assert torch.equal(out.chosen_logps, plain.chosen_logps), mode
            assert torch.equal(out.rejected_logps, plain.rejected_logps), mode


def test_shared_length_gradients_agree_across_modes(lm, batch) -> None:
    model = SequenceLogprobs(copy.deepcopy(lm), chunk_tokens=7)
    grads = {}
    for mode in FORWARD_MODES:
        model.zero_grad(set_to_none=True)
        out = policy_logps(mode, model, batch, 0, CPU, shared_length=True)
        weights = torch.linspace(-1, 1, 6)
        value = (weights * out.chosen_shared_logps).sum() - 0.7 * out.rejected_shared_logps.sum()
        (value + 0.3 * out.chosen_logps.sum()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode, mode_grads in grads.items():
        for name, g in grads["concatenated"].items():
            scale = g.abs().max().clamp(min=1e-12)
            assert (mode_grads[name] - g).abs().max() <= 1e-5 * scale, f"{mode}: gradient of {name}"


# ----------------------------------------------------------------------------------------------
# The loss


def _ld(total: float, shared: float, alpha: float) -> float:
    return shared + alpha * (total - shared)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _logistic(z: float, ls: float) -> tuple[float, float]:
    """-(1 - ls) log sigmoid(z) - ls log sigmoid(-z) and its derivative in z."""
    return -(1 - ls) * _log_sigmoid(z) - ls * _log_sigmoid(-z), -(1 - ls) * _sigmoid(-z) + ls * _sigmoid(z)


FIELDS = ("pc", "pcs", "pr", "prs", "rc", "rcs", "rr", "rrs")  # total and shared, 4 sides
TENSOR_OF = {
    "pc": "chosen_logps",
    "pcs": "chosen_shared_logps",
    "pr": "rejected_logps",
    "prs": "rejected_shared_logps",
    "rc": "ref_chosen_logps",
    "rcs": "ref_chosen_shared_logps",
    "rr": "ref_rejected_logps",
    "rrs": "ref_rejected_shared_logps",
}


def _pairs(count: int = 16) -> list[dict[str, float]]:
    """Per pair: summed log-probs with the shared part a share of the total, token counts."""
    rng = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(count):
        u = torch.rand(10, generator=rng, dtype=torch.float64).tolist()
        row = {"nc": float(1 + int(40 * u[8])), "nr": float(1 + int(40 * u[9]))}
        for i, (total, shared) in enumerate((("pc", "pcs"), ("pr", "prs"), ("rc", "rcs"), ("rr", "rrs"))):
            row[total] = -60 * u[2 * i]
            row[shared] = row[total] * u[2 * i + 1]
        rows.append(row)
    return rows


def _logps(rows: list[dict[str, float]]) -> PreferenceLogps:
    def column(name: str) -> torch.Tensor:
        return torch.tensor([r[name] for r in rows], dtype=torch.float64, requires_grad=name in FIELDS)

    return PreferenceLogps(
        chosen_tokens=column("nc"), rejected_tokens=column("nr"), **{TENSOR_OF[f]: column(f) for f in FIELDS}
    )


def _dpo_reference(row: dict[str, float], cfg: LossConfig) -> tuple[float, dict[str, float]]:
    """LD-DPO with the sigmoid loss and label smoothing: the loss and its derivative in each
    input, by hand."""
    a, beta, ls = cfg.ld_alpha, cfg.beta, cfg.label_smoothing
    both = cfg.ld_sides == "both"
    ref_c = _ld(row["rc"], row["rcs"], a) if both else row["rc"]
    ref_r = _ld(row["rr"], row["rrs"], a) if both else row["rr"]
    z = beta * ((_ld(row["pc"], row["pcs"], a) - ref_c) - (_ld(row["pr"], row["prs"], a) - ref_r))
    loss, dz = _logistic(z, ls)
    ref_total, ref_shared = (a, 1 - a) if both else (1.0, 0.0)
    grads = {
        "pc": dz * beta * a,
        "pcs": dz * beta * (1 - a),
        "pr": -dz * beta * a,
        "prs": -dz * beta * (1 - a),
        "rc": -dz * beta * ref_total,
        "rcs": -dz * beta * ref_shared,
        "rr": dz * beta * ref_total,
        "rrs": dz * beta * ref_shared,
    }
    return loss, grads


def _simpo_reference(row: dict[str, float], cfg: LossConfig) -> tuple[float, dict[str, float]]:
    a, beta = cfg.ld_alpha, cfg.beta
    u = beta * (_ld(row["pc"], row["pcs"], a) / row["nc"] - _ld(row["pr"], row["prs"], a) / row["nr"])
    u -= cfg.gamma_beta_ratio * beta
    loss, du = _logistic(u, cfg.label_smoothing)
    grads = dict.fromkeys(FIELDS, 0.0)
    grads.update(
        pc=du * beta * a / row["nc"],
        pcs=du * beta * (1 - a) / row["nc"],
        pr=-du * beta * a / row["nr"],
        prs=-du * beta * (1 - a) / row["nr"],
    )
    return loss, grads


def _sft_reference(row: dict[str, float], cfg: LossConfig) -> tuple[float, dict[str, float]]:
    """The true NLL whatever ld_alpha (as TRL's sft)."""
    grads = dict.fromkeys(FIELDS, 0.0)
    grads["pc"] = -1 / row["nc"]
    return -row["pc"] / row["nc"], grads


@pytest.mark.parametrize("sides", ["both", "policy"])
@pytest.mark.parametrize(
    ("loss_type", "references"),
    [
        ("dpo", [_dpo_reference]),
        ("simpo", [_simpo_reference]),
        ("sft", [_sft_reference]),
        (["dpo", "sft"], [_dpo_reference, _sft_reference]),
    ],
)
def test_ld_loss_matches_formula_values_and_gradients(loss_type, references, sides: str) -> None:
    cfg = LossConfig(type=loss_type, beta=0.3, label_smoothing=0.1, ld_alpha=0.35, ld_sides=sides)
    rows = _pairs()
    logps = _logps(rows)
    out = compute_loss(logps, cfg)
    out.losses.sum().backward()
    expected = [[ref(row, cfg) for ref in references] for row in rows]
    losses = torch.tensor([sum(loss for loss, _ in per_pair) for per_pair in expected], dtype=torch.float64)
    torch.testing.assert_close(out.losses.detach(), losses, rtol=1e-12, atol=1e-12)
    for name in FIELDS:
        grad = getattr(logps, TENSOR_OF[name]).grad
        got = torch.zeros(len(rows), dtype=torch.float64) if grad is None else grad
        want = torch.tensor([sum(g[name] for _, g in per_pair) for per_pair in expected], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"d loss / d {name}")
    if loss_type == "dpo":  # rewards on the desensitised log-ratios
        a, both = cfg.ld_alpha, sides == "both"
        rewards = [
            cfg.beta * (_ld(r["pc"], r["pcs"], a) - (_ld(r["rc"], r["rcs"], a) if both else r["rc"]))
            for r in rows
        ]
        torch.testing.assert_close(out.chosen_rewards, torch.tensor(rewards, dtype=torch.float64))


LOSS_NAMES = [
    "dpo", "dpo_norm", "wpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
    "sppo_hard", "apo_zero", "apo_down", "discopop", "simpo", "sft",
]  # fmt: skip


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ld_alpha_one_is_the_plain_loss_exactly(name: str) -> None:
    """At 1 the shared sums are never read (NaN here) and every loss is bitwise the plain one."""
    rows = _pairs()
    nan = dict.fromkeys(("pcs", "prs", "rcs", "rrs"), float("nan"))
    with_shared = replace(_logps([{**r, **nan} for r in rows]), chosen_logweights=torch.zeros(16))
    with_shared.rejected_logweights = torch.zeros(16)
    plain = replace(
        with_shared,
        chosen_shared_logps=None,
        rejected_shared_logps=None,
        ref_chosen_shared_logps=None,
        ref_rejected_shared_logps=None,
    )
    cfg = LossConfig(type=name)
    assert not needs_shared_length(cfg) and length_desensitized(with_shared, cfg) is with_shared
    a, b = compute_loss(with_shared, cfg), compute_loss(plain, cfg)
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "sft"])
def test_every_loss_sees_the_desensitised_log_probs(name: str) -> None:
    """compute_loss at ld_alpha equals the plain loss on inputs rewritten by the formula."""
    rows = _pairs()
    cfg = LossConfig(type=name, ld_alpha=0.6)
    logps = replace(_logps(rows), chosen_logweights=torch.full((16,), -0.3))
    logps.rejected_logweights = torch.full((16,), -0.2)
    rewritten = [
        {**r, **{t: _ld(r[t], r[t + "s"], cfg.ld_alpha) for t in ("pc", "pr", "rc", "rr")}} for r in rows
    ]
    manual = replace(
        _logps(rewritten),
        chosen_logweights=logps.chosen_logweights,
        rejected_logweights=logps.rejected_logweights,
    )
    got, want = compute_loss(logps, cfg), compute_loss(manual, replace(cfg, ld_alpha=1.0))
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.chosen_rewards, want.chosen_rewards, rtol=1e-12, atol=1e-12)


def test_ld_without_shared_sums_says_what_is_missing() -> None:
    logps = replace(_logps(_pairs()), ref_chosen_shared_logps=None)
    with pytest.raises(ValueError, match="ref_chosen_shared_logps"):
        compute_loss(logps, LossConfig(ld_alpha=0.5))
    compute_loss(logps, LossConfig(ld_alpha=0.5, ld_sides="policy"))  # the reference's are not read


# ----------------------------------------------------------------------------------------------
# The reference provider: which cache an ld run may use


def test_ld_run_recomputes_a_cache_without_shared_sums_and_its_cache_serves_plain_runs(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, lm
) -> None:
    from engine.recipe import load_config
    from engine.reference import ReferenceProvider

    tables = base_tables(tiny_model_dir, small_data, tmp_path / "run")
    tables["data"]["train"] = [{"path": str(small_data["train"]), "count": 8}]
    plain_cfg = load_config(write_recipe(tmp_path / "r.toml", tables))
    ld_cfg = replace(plain_cfg, loss=replace(plain_cfg.loss, ld_alpha=0.5))
    tokenizer = build_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    dataset = build_dataset(
        [DataSource(path=str(small_data["train"]), count=8)], tokenizer, plain_cfg.data, 0
    )
    model = SequenceLogprobs(lm)

    def get(cfg) -> tuple[object, int]:
        provider = ReferenceProvider(cfg, model, tokenizer, world, torch.float32)
        return provider.get(dataset, "train", cfg.data.train), provider.forwards

    plain, forwards = get(plain_cfg)
    assert forwards == 1 and not plain.has_shared
    ld, forwards = get(ld_cfg)
    assert forwards == 1 and ld.has_shared  # the plain file lacks them: recomputed, replaced
    assert torch.equal(ld.chosen, plain.chosen) and torch.equal(ld.rejected, plain.rejected)
    pairs = PairBatch(
        torch.arange(8),
        torch.ones(8, dtype=torch.bool),
        *([getattr(p, f"{k}_ids") for p in dataset.pairs] for k in ("prompt", "chosen", "rejected")),
    )
    with torch.no_grad():
        direct = policy_logps("concatenated", model, pairs, tokenizer.pad_token_id, CPU, shared_length=True)
    torch.testing.assert_close(ld.chosen_shared, direct.chosen_shared_logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ld.rejected_shared, direct.rejected_shared_logps, rtol=1e-6, atol=1e-6)
    again, forwards = get(ld_cfg)
    assert forwards == 0 and torch.equal(again.chosen_shared, ld.chosen_shared)
    plain_again, forwards = get(plain_cfg)  # the ld file serves a plain run, without the sums
    assert forwards == 0 and not plain_again.has_shared and torch.equal(plain_again.chosen, plain.chosen)
    policy_only = replace(ld_cfg, loss=replace(ld_cfg.loss, ld_sides="policy"))
    assert not get(policy_only)[0].has_shared  # the policy side alone needs none of the reference's


@pytest.mark.slow
def test_a_run_with_ld_alpha_starts_at_ln2(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """End to end (both sides, prefix_shared, which also scores the reference): the policy's and
    the reference's shared-length sums agree at step 0, so train and eval losses start at ln 2."""
    from safetensors import safe_open

    tables = base_tables(tiny_model_dir, small_data, tmp_path / "run")
    tables["data"]["train"] = [{"path": str(small_data["train"]), "count": 16}]
    tables["training"]["max_steps"] = 2
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    proc = main_in_process(recipe, ["loss.ld_alpha=0.5", "training.forward_mode=prefix_shared"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["step"] == 0 and abs(rows[0]["eval/loss"] - LN2) < 1e-6
    assert abs(train_rows(tmp_path / "run")[0]["loss"] - LN2) < 1e-6
    files = sorted((tmp_path / "run" / "reference").glob("reference-*.safetensors"))
    assert len(files) == 2  # train and eval, each with its shared-length sums
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            assert {"chosen_shared_logps", "rejected_shared_logps"} <= set(f.keys())


# ----------------------------------------------------------------------------------------------
# TRL 1.16's rule on the same token log-probs


def test_matches_trl_ld_alpha_on_the_same_token_logps(lm, batch) -> None:
    """TRL's `DPOTrainer.compute_ref_log_probs` (the same masks and sum as its policy side) fed
    the per-token log-probs of our model, against our shared-length sums combined at loss time."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    alpha = 0.3
    model = SequenceLogprobs(lm)
    sequences = list(zip(batch.prompts, batch.chosen)) + list(zip(batch.prompts, batch.rejected))
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    completion_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    token_logps = torch.zeros(len(sequences), width - 1)
    for i, (prompt, completion) in enumerate(sequences):
        ids = torch.tensor([prompt + completion])
        input_ids[i, : ids.shape[1]] = ids[0]
        completion_mask[i, len(prompt) : ids.shape[1]] = 1
        token_logps[i, : ids.shape[1] - 1] = every_position_logps(model, ids)
    token_logps = token_logps * completion_mask[:, 1:]  # TRL's log_probs of prompt positions unused

    def trl_model(**kwargs):
        return SimpleNamespace(log_probs=token_logps)

    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device=CPU, autocast=contextlib.nullcontext),
        ref_model=trl_model,
        model=SimpleNamespace(is_gradient_checkpointing=False),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        ld_alpha=alpha,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": (input_ids != 0).long(),
        "completion_mask": completion_mask,
    }
    trl_chosen, trl_rejected = dpo_trainer.DPOTrainer.compute_ref_log_probs(trainer, trl_model, inputs)
    cfg = LossConfig(ld_alpha=alpha)
    with torch.no_grad():
        for mode in FORWARD_MODES:
            ours = length_desensitized(policy_logps(mode, model, batch, 0, CPU, shared_length=True), cfg)
            torch.testing.assert_close(ours.chosen_logps, trl_chosen, rtol=1e-5, atol=1e-5, msg=mode)
            torch.testing.assert_close(ours.rejected_logps, trl_rejected, rtol=1e-5, atol=1e-5, msg=mode)
