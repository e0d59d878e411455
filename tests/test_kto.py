"""KTO on unpaired data: the row format, paired data split into examples, the dataset-level KL
completions, the loss against a float64 transcription of the paper, and real runs (resume, forward
modes, TRL 1.16's KTOTrainer). z0 over the global batch across ranks and micro-batches is in
tests/test_losses_training.py's sweep (kto runs there with data.unpair)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import DataConfig, DataSource, LossConfig, ModelConfig
from engine.data import build_dataset, split_eval, unpaired_examples
from engine.data.dataset import kl_partners
from engine.data.formats import BadRow, Pair, normalise_row
from engine.errors import UserError
from engine.losses import LOSSES, BatchContext, PreferenceLogps, compute_loss, step_stats, valid_batch
from engine.reference_cache import reference_cache_key
from tests.conftest import base_tables, main_in_process, read_metrics, train_rows, write_recipe

# ----------------------------------------------------------------------------------------------
# The loss


def kto_logps(seed: int, count: int = 8, scale: float = 8.0, dtype=torch.float64) -> PreferenceLogps:
    g = torch.Generator().manual_seed(seed)

    def column(offset: float) -> torch.Tensor:
        return (offset + scale * torch.randn(count, generator=g)).to(dtype)

    return PreferenceLogps(
        chosen_logps=column(-40.0).requires_grad_(True),
        rejected_logps=column(-44.0).requires_grad_(True),
        chosen_tokens=torch.full((count,), 5.0, dtype=dtype),
        rejected_tokens=torch.full((count,), 5.0, dtype=dtype),
        ref_chosen_logps=column(-41.0),
        ref_rejected_logps=column(-52.0),  # the mean KL log-ratio is positive
        desirable=(torch.arange(count) % 3 != 0).to(dtype),
    )


def paper_kto(logps: PreferenceLogps, beta: float, w_d: float, w_u: float) -> torch.Tensor:
    """Ethayarajh et al. 2024, eq. 8, per example in float64: z0 = max(0, mean KL log-ratio),
    detached; lambda_y - v(x, y) with v = lambda_D sigmoid(beta (r - z0)) or
    lambda_U sigmoid(beta (z0 - r))."""
    z0 = torch.clamp((logps.rejected_logps - logps.ref_rejected_logps).mean(), min=0).detach()
    r = logps.chosen_logps - logps.ref_chosen_logps
    out = []
    for i in range(len(r)):
        if logps.desirable[i] == 1:
            out.append(w_d - w_d * 1 / (1 + torch.exp(-beta * (r[i] - z0))))
        else:
            out.append(w_u - w_u * 1 / (1 + torch.exp(-beta * (z0 - r[i]))))
    return torch.stack(out)


@pytest.mark.parametrize("beta, w_d, w_u", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (2.0, 0.7, 1.5)])
def test_kto_is_the_papers_formula_in_value_and_gradient(beta: float, w_d: float, w_u: float) -> None:
    cfg = LossConfig(type="kto", beta=beta, kto_desirable_weight=w_d, kto_undesirable_weight=w_u)
    ours, theirs = kto_logps(1), kto_logps(1)
    assert (ours.rejected_logps - ours.ref_rejected_logps).mean() > 0  # z0 is not clamped away
    out = compute_loss(ours, cfg)
    expected = paper_kto(theirs, beta, w_d, w_u)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-15)
    out.losses.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.chosen_logps.grad, theirs.chosen_logps.grad, rtol=1e-12, atol=1e-15)
    assert ours.rejected_logps.grad is None  # z0 is detached: no gradient through the KL sequences
    torch.testing.assert_close(
        out.chosen_rewards, beta * (theirs.chosen_logps - theirs.ref_chosen_logps).detach()
    )
    torch.testing.assert_close(
        out.extras["kl"][0], (theirs.rejected_logps - theirs.ref_rejected_logps).mean().detach()
    )


def test_kto_z0_is_of_the_global_batch_and_clamped_at_zero() -> None:
    """Micro-batches of 2 with the context of the whole batch (`step_stats`, as TrainStep builds
    it) sum to the whole batch's losses and gradients; a negative mean KL gives z0 = 0."""
    cfg = LossConfig(type="kto", beta=0.5, kto_undesirable_weight=1.33)
    whole = kto_logps(2)
    total = compute_loss(whole, cfg).losses.sum()
    total.backward()
    detached = kto_logps(2)
    stats, _ = step_stats(
        PreferenceLogps(**{k: v.detach() for k, v in vars(detached).items() if v is not None}), cfg, {}
    )
    parts = 0.0
    grad = torch.zeros(8, dtype=torch.float64)
    for start in range(0, 8, 2):
        at = torch.arange(start, start + 2)
        part = kto_logps(2)
        part = PreferenceLogps(**{k: v.detach()[at] for k, v in vars(part).items() if v is not None})
        part.chosen_logps.requires_grad_(True)
        losses = compute_loss(part, cfg, BatchContext(stats, at)).losses
        losses.sum().backward()
        parts = parts + losses.sum().detach()
        grad[at] = part.chosen_logps.grad
    torch.testing.assert_close(parts, total.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, whole.chosen_logps.grad, rtol=1e-12, atol=1e-15)
    negative = kto_logps(3)
    negative.ref_rejected_logps = negative.rejected_logps.detach() + 1.0
    assert compute_loss(negative, cfg).extras["kl"][0].item() == 0.0


def test_kto_at_init_is_half_the_class_weight_and_finite_at_extremes() -> None:
    """pi = ref and z0 = 0: each example's loss is lambda / 2 (1 - sigmoid(0)), not ln 2."""
    cfg = LossConfig(type="kto", beta=0.1, kto_undesirable_weight=1.33)
    logps = kto_logps(4)
    logps.ref_chosen_logps = logps.chosen_logps.detach().clone()
    logps.ref_rejected_logps = logps.rejected_logps.detach().clone()
    losses = compute_loss(logps, cfg).losses
    torch.testing.assert_close(losses, torch.where(logps.desirable > 0, 0.5, 0.665).double())
    for sign in (1.0, -1.0):
        extreme = kto_logps(5, scale=1e4, dtype=torch.float32)
        extreme.ref_chosen_logps = extreme.ref_chosen_logps + sign * 1e4
        out = compute_loss(extreme, LossConfig(type="kto", beta=2.0))
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(extreme.chosen_logps.grad).all()


def test_kto_is_registered_unpaired_and_batch_coupled() -> None:
    spec = LOSSES["kto"]
    assert spec.unpaired and spec.kl_sequences and spec.step_stats is not None and not spec.pair_separable
    assert {"beta", "kto_desirable_weight", "kto_undesirable_weight"} <= spec.reads
    assert not spec.ld_weighted and not spec.f_divergence_ok
    apo = LOSSES["apo_zero_unpaired"]
    assert apo.unpaired and not apo.kl_sequences and apo.step_stats is None and apo.pair_separable
    assert {"beta", "kto_desirable_weight", "kto_undesirable_weight"} <= apo.reads
    assert [n for n, s in LOSSES.items() if s.unpaired] == ["kto", "apo_zero_unpaired"]


def paper_apo_zero_unpaired(logps: PreferenceLogps, beta: float, w_d: float, w_u: float) -> torch.Tensor:
    """D'Oosterlinck et al. 2024, APO-zero's terms per example in float64 (TRL's unpaired form):
    lambda_D (1 - sigmoid(beta r)) for a desirable example, lambda_U sigmoid(beta r) otherwise."""
    r = logps.chosen_logps - logps.ref_chosen_logps
    out = []
    for i in range(len(r)):
        s = 1 / (1 + torch.exp(-beta * r[i]))
        out.append(w_d * (1 - s) if logps.desirable[i] == 1 else w_u * s)
    return torch.stack(out)


@pytest.mark.parametrize("beta, w_d, w_u", [(0.1, 1.0, 1.0), (2.0, 0.7, 1.5)])
def test_apo_zero_unpaired_is_the_papers_formula(beta: float, w_d: float, w_u: float) -> None:
    """Values and gradients; the KL sequences (the rejected side) are not read; finite at
    extremes; lambda / 2 per example at init."""
    cfg = LossConfig(
        type="apo_zero_unpaired", beta=beta, kto_desirable_weight=w_d, kto_undesirable_weight=w_u
    )
    ours, theirs = kto_logps(6), kto_logps(6)
    out = compute_loss(ours, cfg)
    expected = paper_apo_zero_unpaired(theirs, beta, w_d, w_u)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-15)
    out.losses.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.chosen_logps.grad, theirs.chosen_logps.grad, rtol=1e-12, atol=1e-15)
    assert ours.rejected_logps.grad is None and "kl" not in out.extras
    at_init = kto_logps(7)
    at_init.ref_chosen_logps = at_init.chosen_logps.detach().clone()
    torch.testing.assert_close(
        compute_loss(at_init, cfg).losses, torch.where(at_init.desirable > 0, w_d / 2, w_u / 2).double()
    )
    extreme = kto_logps(8, scale=1e4, dtype=torch.float32)
    compute_loss(extreme, cfg).losses.sum().backward()
    assert torch.isfinite(extreme.chosen_logps.grad).all()


def test_kto_cannot_be_combined_with_a_paired_loss(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mixes unpaired losses"):
        compute_loss(kto_logps(1), LossConfig(type=["kto", "sft"]))


# ----------------------------------------------------------------------------------------------
# Rows and examples

NAMES: dict[str, str] = {}


def test_unpaired_rows_take_the_paired_shapes() -> None:
    user = [{"role": "user", "content": "hi"}]
    answer = [{"role": "assistant", "content": "yo"}]
    assert normalise_row({"prompt": "p", "completion": "c", "label": True}, "auto", NAMES) == Pair(
        "p", "c", None
    )
    assert normalise_row({"prompt": "p", "completion": "c", "label": False}, "auto", NAMES) == Pair(
        "p", None, "c"
    )
    assert normalise_row({"prompt": user, "completion": "yo", "label": True}, "auto", NAMES) == Pair(
        user, answer, None
    )
    assert normalise_row({"completion": user + answer, "label": False}, "unpaired", NAMES) == Pair(
        user, None, answer
    )
    renamed = {"q": "p", "a": "c", "good": True}
    assert normalise_row(renamed, "auto", {"prompt": "q", "completion": "a", "label": "good"}) == Pair(
        "p", "c", None
    )


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": "p", "completion": "c", "label": 1}, "label: expected a boolean .* got a number"),
        ({"prompt": "p", "completion": "c", "label": "true"}, "label: expected a boolean"),
        ({"prompt": "p", "label": True}, "missing column 'completion'"),
        ({"completion": "c", "label": True}, "missing column 'prompt'"),
        ({"prompt": "p", "completion": "c"}, "missing column 'chosen'"),  # no label: a paired row
        (
            {"prompt": 3, "completion": [{"role": "assistant", "content": "c"}], "label": True},
            "prompt: expected",
        ),
    ],
)
def test_bad_unpaired_rows_say_what_is_wrong(row: dict, problem: str) -> None:
    with pytest.raises(BadRow, match=problem):
        normalise_row(row, "auto", NAMES)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def unpaired_rows(small_data: dict, count: int) -> list[dict]:
    """`count` unpaired rows from the demo pairs: chosen (desirable) and rejected alternately."""
    pairs = [json.loads(line) for line in small_data["train"].read_text().splitlines()[:count]]
    return [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
        for i, p in enumerate(pairs)
    ]


def test_a_bad_row_stops_the_run_naming_file_and_row(tmp_path: Path, tokenizer, small_data: dict) -> None:
    rows = unpaired_rows(small_data, 4)
    rows[2]["label"] = "yes"
    path = write_rows(tmp_path / "kto.jsonl", rows)
    cfg = DataConfig(train=[DataSource(str(path))], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(
        UserError, match=r"data.train\[0\] .*kto.jsonl.*row 2 \(line 3\): label: expected a boolean"
    ):
        build_dataset(cfg.train, tokenizer, cfg, 0, unpaired=True)


def test_paired_data_splits_into_desirable_and_undesirable_examples(
    tmp_path: Path, tokenizer, small_data: dict
) -> None:
    cache = str(tmp_path / "cache")
    cfg = DataConfig(train=[DataSource(str(small_data["train"]))], cache_dir=cache, max_length=64)
    pairs = build_dataset(cfg.train, tokenizer, cfg, 0)
    with pytest.raises(UserError, match=r"row 0 .*a preference pair .* set data.unpair = true"):
        build_dataset(cfg.train, tokenizer, cfg, 0, unpaired=True)
    cfg.unpair = True
    examples = unpaired_examples(
        build_dataset(cfg.train, tokenizer, cfg, 0, unpaired=True), cfg, 0, "data.train"
    )
    assert len(examples) == 2 * len(pairs)
    for k in (0, 5, 63):
        pair, good, bad = pairs.pairs[k], examples.pairs[2 * k], examples.pairs[2 * k + 1]
        assert (good.desirable, bad.desirable) == (True, False)
        assert good.prompt_ids == bad.prompt_ids == pair.prompt_ids
        assert (good.chosen_ids, bad.chosen_ids) == (pair.chosen_ids, pair.rejected_ids)
    assert examples.stats["unpaired"] == {"desirable": 64, "undesirable": 64, "kl_shift_chunk": 0}
    assert examples.summary().startswith("128 examples (64 desirable, 64 undesirable); ")
    assert pairs.summary().startswith("64 pairs; ")
    # each KL completion is another example's completion, each used once (a cycle)
    completions = [tuple(e.chosen_ids) for e in examples.pairs]
    kl = [tuple(e.rejected_ids) for e in examples.pairs]
    assert sorted(kl) == sorted(completions) and sum(a == b for a, b in zip(kl, completions)) < 4
    # unpaired rows with a paired loss: an error naming the row
    path = write_rows(tmp_path / "kto.jsonl", unpaired_rows(small_data, 4))
    kto = DataConfig(train=[DataSource(str(path))], cache_dir=cache)
    with pytest.raises(UserError, match=r"kto.jsonl\): row 0 .*an unpaired example .* for a paired loss"):
        build_dataset(kto.train, tokenizer, kto, 0)


def test_kl_partners_follow_their_rule() -> None:
    """Chunk 0: one seeded cycle through all examples (no fixed point). Chunk k: TRL's
    `add_kl_completion_ids` (completions[-1:] + completions[:-1] per batch of k) on positions."""
    for count in (2, 7, 50):
        partners = kl_partners(count, 0, seed=3)
        assert sorted(partners) == list(range(count)) and not np.any(partners == np.arange(count))
        seen, at = {0}, 0
        for _ in range(count - 1):
            at = int(partners[at])
            seen.add(at)
        assert len(seen) == count  # a single cycle
        assert np.array_equal(partners, kl_partners(count, 0, seed=3))
        assert count == 2 or not np.array_equal(partners, kl_partners(count, 0, seed=4))
    for count, chunk in ((10, 4), (8, 8), (9, 4)):
        positions = list(range(count))
        trl = []
        for start in range(0, count, chunk):
            batch = positions[start : start + chunk]
            trl += batch[-1:] + batch[:-1]
        assert kl_partners(count, chunk, seed=0).tolist() == trl


def test_the_reference_cache_key_covers_the_kl_pairing(
    tmp_path: Path, tokenizer, small_data: dict, tiny_model_dir: Path
) -> None:
    path = write_rows(tmp_path / "kto.jsonl", unpaired_rows(small_data, 16))
    digests = set()
    for chunk in (0, 4, 8):
        cfg = DataConfig(
            train=[DataSource(str(path))], cache_dir=str(tmp_path / "cache"), kl_shift_chunk=chunk
        )
        examples = unpaired_examples(build_dataset(cfg.train, tokenizer, cfg, 0, unpaired=True), cfg, 0, "t")
        key = reference_cache_key(ModelConfig(path=str(tiny_model_dir)), 0, tokenizer, examples, cfg)
        digests.add(key.digest)
    assert len(digests) == 3


def test_eval_examples_take_kl_completions_from_their_own_set(
    tmp_path: Path, tokenizer, small_data: dict
) -> None:
    cfg = DataConfig(train=[DataSource(str(small_data["train"]))], cache_dir=str(tmp_path / "c"), unpair=True)
    train, held = split_eval(build_dataset(cfg.train, tokenizer, cfg, 0, unpaired=True), 0.25, 0)
    train, held = (unpaired_examples(d, cfg, 0, n) for d, n in ((train, "train"), (held, "eval")))
    own = {tuple(e.chosen_ids) for e in held.pairs}
    assert {tuple(e.rejected_ids) for e in held.pairs} <= own
    assert len(held) == 32 and len(train) == 96


# ----------------------------------------------------------------------------------------------
# Real runs


def test_kto_trains_resumes_exactly_and_packs_the_same(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """3 steps on 12 pairs split into 24 examples, with eval at step 0 (each example's loss is
    its weight / 2 there), then a resume from step 2 that replays step 3 bitwise (the pairing is
    dataset-level), and the packed forward mode's losses equal to 1e-5."""
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "straight")
    tables["data"] |= {"unpair": True, "train": [{"path": str(small_data["train"]), "count": 12}]}
    tables["training"]["max_steps"] = 3
    tables["loss"] = {"type": "kto", "beta": 0.1, "kto_undesirable_weight": 1.33}
    tables["checkpoint"] = {"interval_steps": 2, "keep_last": 2}
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    proc = main_in_process(recipe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "straight")
    assert rows[0]["step"] == 0 and abs(rows[0]["eval/loss"] - (0.5 + 0.665) / 2) < 1e-6  # half desirable
    assert rows[0]["eval/kl"] == 0 and "eval/rewards/accuracies" not in rows[0]
    straight = train_rows(tmp_path / "straight")
    assert (
        abs(
            straight[0]["loss"]
            - (straight[0]["kto/desirable"] * 0.5 + (1 - straight[0]["kto/desirable"]) * 0.665)
        )
        < 1e-6
    )
    resumed = [
        f"job.output_dir={tmp_path / 'resumed'}",
        f"checkpoint.resume={tmp_path / 'straight/checkpoints/step-2'}",
    ]
    assert main_in_process(recipe, [*resumed, "data.eval=[]"]).returncode == 0
    assert [r["loss"] for r in train_rows(tmp_path / "resumed")] == [r["loss"] for r in straight[2:]]
    packed = ["job.output_dir=" + str(tmp_path / "packed"), "training.forward_mode=packed", "data.eval=[]"]
    assert main_in_process(recipe, [*packed, "checkpoint.interval_steps=0"]).returncode == 0
    for a, b in zip(train_rows(tmp_path / "packed"), straight):
        for key in ("loss", "kl", "logps/kl", "rewards/chosen", "rewards/rejected"):
            # relative: logps/kl sums ~50 nats of fp32 terms, laid out in another order; a reward
            # is beta x the difference of two such sums (~1e-6 nats apart between layouts)
            absolute = 1e-5 if key.startswith("rewards/") else 1e-6
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=absolute), (key, a, b)


@pytest.mark.parametrize("override", ["data.unpair=true", "data.kl_shift_chunk=8", "data.format=unpaired"])
def test_unpaired_data_settings_need_an_unpaired_loss(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, override: str
) -> None:
    from engine.recipe import load_config

    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, tmp_path / "o"))
    with pytest.raises(
        UserError,
        match=rf"data.{override.split('=')[0][5:]}=.* is for unpaired losses \(kto, apo_zero_unpaired\)",
    ):
        load_config(recipe, [override])
    load_config(recipe, [override, "loss.type=kto"])
    if override.startswith("data.kl_shift_chunk"):  # a loss without KL sequences
        with pytest.raises(
            UserError, match=r"data.kl_shift_chunk=8 chooses KL sequences, .* \(a KL term: kto\)"
        ):
            load_config(recipe, [override, "loss.type=apo_zero_unpaired"])


# ----------------------------------------------------------------------------------------------
# TRL 1.16's KTOTrainer

TRL_STEPS = 5


def trl_rows(small_data: dict) -> list[dict]:
    """8 string examples (5 desirable: their pair's chosen; 3 undesirable: its rejected) whose
    prompts end on a token boundary (a newline), so TRL's tokenisation of prompt + completion
    splits where fsdpo's separate one does."""
    pairs = [json.loads(line) for line in small_data["train"].read_text().splitlines()[:8]]
    return [
        {
            "prompt": p["prompt"][-1]["content"] + "\n",
            "completion": p["chosen" if i % 3 else "rejected"][-1]["content"],
            "label": bool(i % 3),
        }
        for i, p in enumerate(pairs)
    ]


@pytest.mark.parametrize(
    "loss, forward_mode", [("kto", "concatenated"), ("apo_zero_unpaired", "prefix_shared")]
)
def test_unpaired_losses_train_trl_kto_trainers_curve(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, tokenizer, world, loss: str, forward_mode: str
) -> None:
    """5 steps of 8 examples (one step = the whole data set, one micro-batch) against TRL 1.16's
    KTOTrainer (its loss_type) on the same weights: the same tokens (prompt, completion with its
    EOS, for kto the KL completion by TRL's +1 shift within chunks of 8: data.kl_shift_chunk = 8;
    apo_zero_unpaired has none, its empty side runs in prefix_shared's layout here), the initial
    policy as reference, fp32, AdamW with the same settings (decay on weight matrices only on
    both sides), a constant lr, clipping; each step's loss, kl (z0), rewards and log-probs to
    1e-5 (they agree to ~4e-6 here: fp32 sums in another order)."""
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    rows = trl_rows(small_data)
    path = write_rows(tmp_path / "kto.jsonl", rows)
    settings = {"lr": 1e-3, "weight_decay": 0.01, "max_grad_norm": 1.0, "beta": 0.1, "w_u": 1.33}
    kl = loss == "kto"
    cfg = DataConfig(
        train=[DataSource(str(path))], cache_dir=str(tmp_path / "cache"), max_length=64, kl_shift_chunk=8 * kl
    )
    examples = build_dataset(cfg.train, tokenizer, cfg, 0, unpaired=True)
    ours = unpaired_examples(examples, cfg, 0, "t", kl=kl)

    def model():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    steps: list[dict[str, float]] = []  # TRL's, each step's loss (unrounded) and metrics

    class Recorded(kto_trainer.KTOTrainer):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            steps.append({"loss": loss.item(), **{k: v[-1] for k, v in self._metrics["train"].items() if v}})
            return loss

    args = kto_trainer.KTOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=8,
        max_steps=TRL_STEPS,
        learning_rate=settings["lr"],
        weight_decay=settings["weight_decay"],
        max_grad_norm=settings["max_grad_norm"],
        lr_scheduler_type="constant",
        loss_type=loss,
        beta=settings["beta"],
        undesirable_weight=settings["w_u"],
        max_length=64,
        activation_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Recorded(
        model=model(),
        ref_model=model(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    theirs = trainer.train_dataset
    for k, example in enumerate(ours.pairs):
        assert example.prompt_ids == theirs[k]["prompt_ids"], k
        assert example.chosen_ids == theirs[k]["completion_ids"], k
        assert example.rejected_ids == (theirs[k]["KL_completion_ids"] if kl else []), k
        assert example.desirable == theirs[k]["label"], k
    trainer.train()

    tables = base_tables(tiny_model_dir, small_data, tmp_path / "fsdpo")
    tables["data"] |= {"train": [str(path)], "eval": [], "kl_shift_chunk": 8 * kl}
    tables["loss"] = {"type": loss, "beta": settings["beta"], "kto_undesirable_weight": settings["w_u"]}
    tables["training"] |= {"max_steps": TRL_STEPS, "forward_mode": forward_mode}
    tables["optimizer"] = {k: settings[k] for k in ("lr", "weight_decay", "max_grad_norm")}
    tables["scheduler"] = {"type": "constant", "warmup_steps": 0}
    tables["export"] = {"enabled": False}
    proc = main_in_process(write_recipe(tmp_path / "r.toml", tables))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fsdpo = train_rows(tmp_path / "fsdpo")
    assert len(fsdpo) == len(steps) == TRL_STEPS
    for step, (a, b) in enumerate(zip(fsdpo, steps)):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) < 1e-5, (step, key, a[key], b[key])
        if kl:
            assert abs(a["kl"] - b["kl"]) < 1e-5, (step, a["kl"], b["kl"])
        else:  # no KL term, no KL sequences
            assert "kl" not in a and "logps/kl" not in a and b["kl"] == 0
    assert abs(fsdpo[-1]["loss"] - fsdpo[0]["loss"]) > 1e-2  # it trained


@pytest.mark.parametrize("name", [n for n, spec in LOSSES.items() if spec.step_stats is not None])
def test_evaluation_statistics_exclude_padding_pairs(name: str) -> None:
    """An eval batch's padding pairs (the last batch's repeats, `shard_for_inference`) take no
    part in a batch-coupled loss's statistics (kto's z0): the valid pairs' losses are those of
    the valid pairs alone, however extreme the padding."""
    cfg = LossConfig(type=name, beta=0.5)
    logps = kto_logps(9)
    if name != "kto":
        logps.desirable = None
    valid = torch.arange(8) < 5
    padded = PreferenceLogps(**{k: v.detach().clone() for k, v in vars(logps).items() if v is not None})
    padded.rejected_logps[~valid] += 1e3  # kto: a mean KL log-ratio ~ +375 with them
    padded.chosen_logps[~valid] -= 1e3
    alone = PreferenceLogps(**{k: v.detach()[:5] for k, v in vars(logps).items() if v is not None})
    ours = compute_loss(padded, cfg, valid_batch(padded, cfg, valid))
    torch.testing.assert_close(ours.losses[:5], compute_loss(alone, cfg).losses, rtol=1e-12, atol=1e-15)
    if name == "kto":
        kl = (alone.rejected_logps - alone.ref_rejected_logps).mean().clamp(min=0)
        torch.testing.assert_close(ours.extras["kl"], kl.expand(8))
        assert compute_loss(padded, cfg).extras["kl"][0] > 100  # the whole batch's would be wrong
