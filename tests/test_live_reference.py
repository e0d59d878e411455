"""The live reference (`reference.mode = "live"`): TDPO's loss and its chunked token-level KL
against float64 transcriptions, a live reference equal to the cached one at step 0, TR-DPO's
syncs against policy snapshots and their exact resume, LoRA's reference without a copy, and the
recipe errors of the combinations that cannot apply."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import Config, LossConfig
from engine.errors import UserError
from engine.forward import SequenceLogprobs, concatenated_layout, reference_scores, score_pairs
from engine.losses import PreferenceLogps, compute_loss
from tests.conftest import (
    LN2,
    base_tables,
    load_final_weights,
    main_in_process,
    run_sweep,
    train_rows,
    write_recipe,
)

TOKEN_KL = ["tdpo", "tdpo1"]  # the losses that need token-level KL sums, checked here

# ----------------------------------------------------------------------------------------------
# TDPO's loss: a float64 transcription of the paper's code (trainers.py `tdpo_loss`)


def _paper_tdpo(chosen_margin, rejected_margin, chosen_kl, rejected_kl, beta, alpha, tdpo2):
    if not tdpo2:
        logits = (chosen_margin - rejected_margin) - (rejected_kl - chosen_kl)
    else:
        logits = (chosen_margin - rejected_margin) - alpha * (rejected_kl - chosen_kl.detach())
    losses = -F.logsigmoid(beta * logits)
    return (
        losses,
        beta * (chosen_margin + chosen_kl).detach(),
        beta * (rejected_margin + rejected_kl).detach(),
    )


def _logps(seed: int, scale: float = 3.0) -> PreferenceLogps:
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    kl = lambda: (torch.rand(6, generator=g, dtype=torch.float64) * scale).requires_grad_()  # noqa: E731
    tokens = torch.full((6,), 5.0, dtype=torch.float64)
    return PreferenceLogps(
        draw(6), draw(6), tokens, tokens, draw(6), draw(6), chosen_token_kl=kl(), rejected_token_kl=kl()
    )


@pytest.mark.parametrize(("name", "tdpo2"), [("tdpo1", False), ("tdpo", True)])
def test_tdpo_matches_the_papers_code_in_values_and_gradients(name: str, tdpo2: bool) -> None:
    cfg = LossConfig(type=name, beta=0.3, tdpo_alpha=0.7 if tdpo2 else 0.5)
    ours = _logps(0)
    out = compute_loss(ours, cfg)
    out.losses.sum().backward()
    theirs = _logps(0)
    losses, chosen, rejected = _paper_tdpo(
        theirs.chosen_logps - theirs.ref_chosen_logps,
        theirs.rejected_logps - theirs.ref_rejected_logps,
        theirs.chosen_token_kl,
        theirs.rejected_token_kl,
        cfg.beta,
        cfg.tdpo_alpha,
        tdpo2,
    )
    losses.sum().backward()
    torch.testing.assert_close(out.losses, losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.chosen_rewards, chosen, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.rejected_rewards, rejected, rtol=1e-12, atol=0)
    for field in ("chosen_logps", "rejected_logps", "chosen_token_kl", "rejected_token_kl"):
        torch.testing.assert_close(getattr(ours, field).grad, getattr(theirs, field).grad, rtol=1e-12, atol=0)
    # TDPO2 stops the chosen KL's gradient, TDPO1 does not
    assert (ours.chosen_token_kl.grad is None) == tdpo2


@pytest.mark.parametrize("name", ["tdpo1", "tdpo"])
def test_tdpo_is_finite_at_extreme_inputs(name: str) -> None:
    logps = _logps(1, scale=1e4)
    out = compute_loss(logps, LossConfig(type=name))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(logps.chosen_logps.grad).all()
    assert torch.isfinite(logps.rejected_token_kl.grad).all()


# ----------------------------------------------------------------------------------------------
# The chunked token-level KL against a dense float64 computation


def _tiny_lm(seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import ASSETS

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_chunked_token_kl_equals_a_dense_float64_computation() -> None:
    """Per-sequence sums of KL(ref || policy) over the scored tokens, chunk by chunk (3 tokens, so
    several chunks, recomputed in backward), equal full-vocabulary float64 logits of both models
    at every position, in value and in the policy's gradient."""
    from engine.data import PairBatch

    policy, ref = _tiny_lm(1), _tiny_lm(2)
    batch = PairBatch(
        prompts=[[5, 6, 7], [8, 9]],
        chosen=[[10, 11, 12, 13], [14, 15]],
        rejected=[[16, 17], [18, 19, 20, 21, 22]],
        pair_ids=torch.arange(2),
        valid=torch.ones(2, dtype=torch.bool),
    )
    (inputs,) = concatenated_layout(batch, 0, torch.device("cpu"))
    scored_policy, scored_ref = (
        SequenceLogprobs(policy, chunk_tokens=3),
        SequenceLogprobs(ref, chunk_tokens=3),
    )
    logps = score_pairs(scored_policy, [inputs], reference=reference_scores(scored_ref, [inputs], True))
    kl = torch.cat([logps.chosen_token_kl, logps.rejected_token_kl])
    kl.sum().backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()

    with torch.no_grad():
        ref_logp = ref.double()(inputs.input_ids, attention_mask=inputs.attention_mask).logits.log_softmax(-1)
    policy_logits = policy.double()(inputs.input_ids, attention_mask=inputs.attention_mask).logits
    dense = (ref_logp.exp() * (ref_logp - policy_logits.log_softmax(-1))).sum(-1).flatten()  # [R T]
    expected = torch.zeros(4, dtype=torch.float64).index_add(
        0, inputs.score_sequences, dense[inputs.score_positions]
    )
    expected.sum().backward()
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert (expected > 0).all()
    for name, grad in ours.items():
        torch.testing.assert_close(
            grad.double(), dict(policy.named_parameters())[name].grad, rtol=1e-4, atol=1e-6
        )
    # the policy's own log-probs are unchanged by the KL's extra work
    plain = score_pairs(scored_policy.float(), [inputs])
    torch.testing.assert_close(plain.chosen_logps, logps.chosen_logps, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Training runs


def _tables(tiny_model_dir: Path, small_data: dict, out: Path, **loss) -> dict:
    tables = base_tables(tiny_model_dir, small_data, out)
    tables["data"]["eval"] = []
    tables["training"] |= {"micro_batch_size": 4, "max_steps": 3}
    tables["loss"] |= loss
    tables["export"] = {"enabled": False}
    return tables


def _trainer(tmp_path: Path, tables: dict, world, overrides: list[str] = ()):
    from engine.recipe import load_config
    from engine.trainer import Trainer

    return Trainer(load_config(write_recipe(tmp_path / "r.toml", tables), overrides), world)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `model` as a checkpoint saves them: its state dict (which, under FSDP2,
    registers the shards again: a unit left gathered after a forward is read from its shards)."""
    state = model.state_dict()
    full = {
        n: state[n].full_tensor() if hasattr(state[n], "full_tensor") else state[n]
        for n, _ in model.named_parameters()
    }
    return {n: p.detach().double().clone() for n, p in full.items()}


def test_live_reference_is_the_cached_one_at_step_0_and_tr_dpo_syncs_it(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """TDPO with TR-DPO's sync_steps=2, sync_alpha=0.25 on the sharded model: at step 0 the live
    reference's log-probs are the cached reference's (`compute_reference_logps` of the same
    weights), the loss is exactly ln 2 and the token-level KL 0; the reference stays the initial
    weights p0 after step 1 and is 0.25 p2 + 0.75 p0 after steps 2 and 3 (p_k: the policy after
    step k), frozen; the KL grows."""
    from engine.data import collate
    from engine.forward import policy_logps
    from engine.metrics import PairMetrics

    tables = _tables(tiny_model_dir, small_data, tmp_path / "out", type="tdpo")
    tables["training"]["logprob_chunk_tokens"] = 16  # several chunks per micro-batch
    tables["reference"] = {"mode": "live", "sync_steps": 2, "sync_alpha": 0.25}
    trainer = _trainer(tmp_path, tables, world)
    assert all(not p.requires_grad for p in trainer.live.model.parameters())
    initial = _weights(trainer.model)
    assert all(torch.equal(initial[n], w) for n, w in _weights(trainer.live.model).items())

    ids = trainer.sampler.micro_batches(0)[0]
    batch = collate(trainer.train_data, ids)
    # the cached reference's forward (`compute_reference_logps`'s: eval mode, no grad)
    trainer.model.eval()
    with torch.no_grad():
        cached = policy_logps("concatenated", trainer.model, batch, trainer.pad_id, world.device)
    trainer.model.train()
    live = trainer.live.scores(trainer.step.prepare(batch).inputs).logps
    assert torch.equal(live.chosen_logps, cached.chosen_logps)
    assert torch.equal(live.rejected_logps, cached.rejected_logps)

    expected, rows = initial, []
    for step in range(3):
        window = PairMetrics()
        trainer.train_step(step, window)
        rows.append(window.reduce(world.device))
        policy = _weights(trainer.model)
        if step + 1 == 2:
            expected = {n: 0.25 * policy[n] + 0.75 * initial[n] for n in initial}
        for name, value in _weights(trainer.live.model).items():
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=f"{step} {name}")
    assert rows[0]["loss"] == float(torch.tensor(LN2)) and rows[0]["token_kl/chosen"] == 0.0
    assert rows[0]["rewards/margins"] == 0.0
    assert not torch.equal(policy["causal_lm.lm_head.weight"], expected["causal_lm.lm_head.weight"])
    assert rows[-1]["token_kl/chosen"] > 0 and rows[-1]["token_kl/rejected"] > 0


def test_tr_dpo_resumes_exactly(tmp_path: Path, tiny_model_dir: Path, small_data: dict, world) -> None:
    """4 steps straight vs 2 + resume from step-2 (the reference synced at step 2 comes from the
    checkpoint): bitwise equal final weights and the same losses."""
    tables = _tables(tiny_model_dir, small_data, tmp_path / "straight")
    tables["training"] |= {"max_steps": 4, "micro_batch_size": 8}
    tables["reference"] = {"mode": "live", "sync_steps": 2, "sync_alpha": 0.5}
    tables["checkpoint"] = {"interval_steps": 2, "keep_last": 2}
    tables["export"] = {"enabled": True}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    assert main_in_process(recipe).returncode == 0
    saved = tmp_path / "straight" / "checkpoints" / "step-2"
    overrides = [f"job.output_dir={tmp_path / 'resumed'}", f"checkpoint.resume={saved}"]
    proc = main_in_process(recipe, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = train_rows(tmp_path / "straight"), train_rows(tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight][2:]
    a, b = load_final_weights(tmp_path / "straight"), load_final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kto_under_a_live_reference_trains_the_cached_curve(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """An unpaired, batch-coupled loss reads its labels and its reference from the live model as
    from the cache: without a sync the live reference is the initial policy, so the curves agree."""
    tables = _tables(tiny_model_dir, small_data, tmp_path / "cached", type="kto")
    tables["data"] |= {"unpair": True, "train": [{"path": str(small_data["train"]), "count": 8}]}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    assert main_in_process(recipe).returncode == 0
    live = [f"job.output_dir={tmp_path / 'live'}", "reference.mode=live"]
    proc = main_in_process(recipe, live)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cached, got = train_rows(tmp_path / "cached"), train_rows(tmp_path / "live")
    assert len(got) == 3 and cached[0]["loss"] != cached[-1]["loss"]
    for a, b in zip(cached, got):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "kto/desirable"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a, b)


# TDPO (the gathered reference LM head) and TR-DPO (the shard-local sync) on 2 ranks
LIVE_RUNS = {
    "tdpo": ["loss.type=tdpo", "reference.mode=live", "training.logprob_chunk_tokens=8"],
    "tr_dpo": [
        "reference.mode=live",
        "reference.sync_steps=2",
        "reference.sync_alpha=0.5",
        "checkpoint.interval_steps=2",
        "export.enabled=true",
    ],
}


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume_on_one(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """One launch of 2 ranks (the policy and the live reference sharded over both, one micro-batch
    of 2 each) against the same global batch of 4 on 1 rank in-process (2 micro-batches): the
    same per-step losses; the 2-rank TR-DPO checkpoint at step 2 (its reference just synced, saved
    in 2 shards) resumed on 1 rank continues with the 2-rank run's loss and ends at its final
    weights. Not bitwise across world sizes: the gradients add up in another order."""
    import math

    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    tables = _tables(tiny_model_dir, small_data, tmp_path / "unused")
    tables["training"] |= {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    two = run_sweep(recipe, tmp_path / "two", LIVE_RUNS, nproc=2)

    def losses(out: Path, *overrides: str) -> list[float]:
        proc = main_in_process(recipe, [*overrides, f"job.output_dir={out}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [row["loss"] for row in train_rows(out)]

    def same(ours: list[float], theirs: list[float]) -> bool:
        close = (math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(ours, theirs))
        return len(ours) == len(theirs) and all(close)

    for name, overrides in LIVE_RUNS.items():
        theirs = two[name]["losses"]
        assert theirs[0] != theirs[-1] and same(losses(tmp_path / name, *overrides), theirs), name
    saved = tmp_path / "two" / "tr_dpo" / "checkpoints" / "step-2"
    keys = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert any(key.startswith("reference.") for key in keys)
    # resumed on 1 rank: the reference is the one synced at step 2, 0.5 p2 + 0.5 p0 (p2 the policy
    # restored, p0 the initial weights), its 2 shards read as one
    resume = [*LIVE_RUNS["tr_dpo"], f"job.output_dir={tmp_path / 'resumed'}", f"checkpoint.resume={saved}"]
    trainer = _trainer(tmp_path, tables, world, resume)
    policy, initial = _weights(trainer.model), load_file(tiny_model_dir / "model.safetensors")
    for name, value in _weights(trainer.live.model).items():
        p0 = initial[name.removeprefix("causal_lm.")].double()
        torch.testing.assert_close(value, 0.5 * policy[name] + 0.5 * p0, rtol=1e-6, atol=1e-7, msg=name)
    trainer.train()
    resumed = [row["loss"] for row in train_rows(tmp_path / "resumed")]
    assert same(resumed, two["tr_dpo"]["losses"][2:]), (resumed, two["tr_dpo"]["losses"])
    final = torch.load(tmp_path / "two" / "tr_dpo" / "weights.pt", weights_only=True)
    for run in ("resumed", "tr_dpo"):
        weights = load_final_weights(tmp_path / run)
        assert weights.keys() == final.keys()
        for key, value in weights.items():
            torch.testing.assert_close(value, final[key], rtol=0, atol=1e-5, msg=f"{run}: {key}")


def test_lora_live_reference_is_the_base_model_without_a_copy(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """With LoRA the live reference is the policy itself (no second set of parameters) run with
    its adapters off: TDPO starts at ln 2 and KL 0, and once the adapters moved the reference's
    log-probs are still the base model's."""
    from engine.data import collate
    from engine.metrics import PairMetrics

    tables = _tables(tiny_model_dir, small_data, tmp_path / "out", type="tdpo")
    tables["reference"] = {"mode": "live"}
    tables["lora"] = {"enabled": True, "r": 4}
    trainer = _trainer(tmp_path, tables, world)
    assert trainer.live.model is trainer.model and trainer.live.adapters_off
    assert sum(p.numel() for p in trainer.model.parameters()) == trainer.num_params
    window = PairMetrics()
    trainer.train_step(0, window)
    row = window.reduce(world.device)
    assert row["loss"] == float(torch.tensor(LN2)) and row["token_kl/rejected"] == 0.0
    with torch.no_grad():
        for p in trainer.model.parameters():  # move the adapters: the reference must not follow
            if p.requires_grad:
                p.add_(0.05)
    micro = trainer.step.prepare(collate(trainer.train_data, list(range(4))))
    ref = trainer.live.scores(micro.inputs).logps
    with torch.no_grad():
        with trainer.model.causal_lm.disable_adapter():
            base = score_pairs(trainer.model, micro.inputs)
        policy = score_pairs(trainer.model, micro.inputs)
    assert torch.equal(ref.chosen_logps, base.chosen_logps)
    assert not torch.allclose(policy.chosen_logps, base.chosen_logps)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reference.mode": "live", "loss.type": "simpo"}, "uses no reference"),
        ({"loss.type": "tdpo"}, 'set reference.mode = "live"'),
        ({"reference.sync_steps": 4}, 'set reference.mode = "live"'),
        ({"reference.mode": "live", "reference.sync_alpha": 0.5}, "needs reference.sync_steps > 0"),
        ({"reference.mode": "live", "reference.sync_steps": 2, "lora.enabled": True}, "TR-DPO needs full"),
        ({"reference.mode": "live", "reference.sync_alpha": 0.0}, "expected a number in (0, 1]"),
        ({"reference.mode": "live", "loss.type": "tdpo1", "loss.tdpo_alpha": 0.3}, "loss.tdpo_alpha=0.3"),
    ],
)
def test_bad_combinations_are_user_errors(tmp_path: Path, settings: dict, message: str) -> None:
    from engine.recipe import load_config, toml_value

    recipe = write_recipe(tmp_path / "r.toml", {"model": {"path": "m"}, "data": {"train": ["t.jsonl"]}})
    with pytest.raises(UserError) as error:
        load_config(recipe, [f"{k}={toml_value(v)}" for k, v in settings.items()])
    assert message in str(error.value)


def test_dry_run_counts_the_live_reference() -> None:
    from transformers import AutoConfig

    from engine.plan import estimate_memory, measure_model
    from tests.conftest import ASSETS

    size = measure_model(AutoConfig.from_pretrained(ASSETS / "tiny-llama"), Config().lora)
    cached = Config()
    live = Config()
    live.reference.mode = "live"
    assert "reference" not in {i.name for i in estimate_memory(cached, size, 2, 2).items}
    assert estimate_memory(live, size, 2, 2).get("reference") == 4 * size.parameters // 2
    live.lora.enabled = True
    assert estimate_memory(live, size, 2, 2).get("reference") == 0


def test_build_reference_only_has_nothing_to_cache_with_a_live_reference(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.toml", _tables(tiny_model_dir, small_data, out, type="tdpo"))
    proc = main_in_process(recipe, ["--build-reference-only", "reference.mode=live"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if "reference.mode" in line]
    assert 'reference.mode = "live": --build-reference-only has nothing to cache' in line
    assert not (out / "reference").exists()


# ----------------------------------------------------------------------------------------------
# TR-DPO against TRL 1.16's DPOTrainer with sync_ref_model (tests/test_trl_curves.py's setting:
# 5 steps of 4 pairs, one process, fp32, AdamW, linear decay without warmup, clipping)

TRL_STEPS, TRL_BATCH, TRL_BETA = 5, 4, 0.5
TRL_OPTIMIZER = {"lr": 2e-3, "weight_decay": 0.01, "betas": [0.9, 0.95], "eps": 1e-6, "max_grad_norm": 0.5}


@pytest.mark.filterwarnings(
    "ignore:`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated:FutureWarning"
)
def test_tr_dpo_curve_equals_trls_sync_ref_model(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    """TR-DPO with a soft update every 2 steps (sync_steps 2, alpha 0.5): fsdpo's 5 per-step
    losses, final policy and final reference equal those of TRL's DPOTrainer with
    sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5 (its
    SyncRefModelCallback mixes on each step end whose global step is a multiple of 2, after the
    optimizer step: fsdpo syncs then too), to 1e-4. TRL trains on fsdpo's own token ids, in
    fsdpo's order (its tokenisation bypassed, as engine/bench/trl.py does), nothing truncated."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.export import full_hf_state_dict

    tables = base_tables(tiny_model_dir, small_data, tmp_path / "fsdpo")
    tables["data"]["eval"] = []
    tables["loss"] = {"type": "dpo", "beta": TRL_BETA}
    tables["training"] = {
        "global_batch_size": TRL_BATCH,
        "micro_batch_size": TRL_BATCH,
        "max_steps": TRL_STEPS,
    }
    tables["optimizer"] = TRL_OPTIMIZER
    tables["scheduler"] = {"type": "linear", "warmup_steps": 0}
    tables["parallel"] = {"mixed_precision": "fp32"}
    tables["reference"] = {"mode": "live", "sync_steps": 2, "sync_alpha": 0.5}
    tables["export"] = {"enabled": False}
    ours = _trainer(tmp_path, tables, world)
    pairs = [
        ours.train_data.pairs[i] for s in range(TRL_STEPS) for b in ours.sampler.micro_batches(s) for i in b
    ]
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert longest < tables["data"]["max_length"]  # nothing truncated: TRL gets max_length=None
    ours.train()
    our_losses = [row["loss"] for row in train_rows(tmp_path / "fsdpo")]

    class Pretokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # fsdpo's ids (EOS included)
            return dataset

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    o = TRL_OPTIMIZER
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=TRL_BATCH, max_steps=TRL_STEPS,
        learning_rate=o["lr"], weight_decay=o["weight_decay"], adam_beta1=o["betas"][0],
        adam_beta2=o["betas"][1], adam_epsilon=o["eps"], max_grad_norm=o["max_grad_norm"],
        lr_scheduler_type="linear", warmup_steps=0, beta=TRL_BETA, max_length=None,
        sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5,
        logging_steps=1, report_to=[], save_strategy="no", train_sampling_strategy="sequential",
        dataloader_num_workers=0, use_cpu=True, bf16=False, disable_tqdm=True,
    )  # fmt: skip
    model, ref_model = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
        for _ in range(2)
    )
    theirs = Pretokenized(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_dict({c: [getattr(p, c) for p in pairs] for c in columns}),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    theirs.train()
    their_losses = [entry["loss"] for entry in theirs.state.log_history if "loss" in entry]

    assert len(our_losses) == len(their_losses) == TRL_STEPS and our_losses[0] != our_losses[-1]
    torch.testing.assert_close(
        torch.tensor(our_losses), torch.tensor(their_losses), rtol=0, atol=1e-4,
        msg=lambda m: f"fsdpo {our_losses} vs TRL {their_losses}\n{m}",
    )  # fmt: skip
    for mine, trls in ((ours.model, model), (ours.live.model, ref_model)):
        expected = trls.state_dict()
        for key, value in full_hf_state_dict(mine).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-4, msg=key)
