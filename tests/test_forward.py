"""Per-sequence log-probs: the four forward modes agree (values and gradients, plain, under FSDP2,
with activation checkpointing), the chunked head equals full-logit math, and the packed layouts
are what their docstrings say."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionSegments, segment_attention
from engine.config import DataConfig, DataSource, ModelConfig, ParallelConfig
from engine.data import PairBatch, build_dataset, collate
from engine.forward import (
    FORWARD_MODES,
    SequenceLogprobs,
    padded_rows,
    policy_logps,
    score_tokens,
    shared_prefix_row,
)
from engine.model import build_tokenizer
from tests.conftest import data_mesh

CPU = torch.device("cpu")
FIELDS = (
    "chosen_logps",
    "rejected_logps",
    "chosen_tokens",
    "rejected_tokens",
    "chosen_logweights",
    "rejected_logweights",
)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, small_data: dict):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    data = build_dataset([DataSource(path=str(small_data["train"]))], tokenizer, DataConfig(max_length=64), 0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return tokenizer, data, lm


@pytest.fixture(scope="module")
def varied_batch() -> PairBatch:
    """6 random pairs: prompts 1-40 tokens, completions 1-60 tokens (one of each length 1)."""
    g = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 400, (n,), generator=g).tolist()

    prompts = [tokens(n) for n in (1, 40, 7, 23, 12, 31)]
    chosen = [tokens(n) for n in (5, 1, 60, 17, 33, 9)]
    rejected = [tokens(n) for n in (44, 12, 1, 29, 8, 50)]
    return PairBatch(torch.arange(6), torch.ones(6, dtype=torch.bool), prompts, chosen, rejected)


def _reference_scores(lm, sequences):
    """float64 per-sequence log-probs and WPO log-weights from full logits, one sequence at a time."""
    lm64 = copy.deepcopy(lm).double()
    logps, logweights = [], []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion])
        logits = lm64(ids, use_cache=False).logits[0, :-1]
        targets = ids[0, 1:]
        logprobs = torch.log_softmax(logits, dim=-1)
        token_lp = logprobs.gather(-1, targets[:, None])[:, 0][len(prompt) - 1 :]
        log_sum_p2 = torch.logsumexp(2 * logprobs, dim=-1)[len(prompt) - 1 :]
        logps.append(token_lp.sum())
        logweights.append((token_lp - log_sum_p2).mean())
    return torch.stack(logps), torch.stack(logweights)


def _run(model, mode: str, batch: PairBatch, pad_id: int = 0):
    """Log-probs (with WPO log-weights) and the gradients of a fixed function of them."""
    model.zero_grad(set_to_none=True)
    out = policy_logps(mode, model, batch, pad_id, CPU, True)
    (out.chosen_logps.sum() - 0.7 * out.rejected_logps.sum()).backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
    }
    return out, grads


def _assert_same(
    out, grads, base, base_grads, rtol: float, label: str, grad_rtol: float | None = None
) -> None:
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(out, name).detach(),
            getattr(base, name).detach(),
            rtol=rtol,
            atol=rtol,
            msg=f"{label}: {name}",
        )
    for name, g in base_grads.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (grads[name] - g).abs().max() <= (grad_rtol or rtol) * scale, f"{label}: gradient of {name}"


@pytest.mark.parametrize("chunk_tokens", [7, 0])
def test_chunked_logps_and_logweights_match_float64_full_logits(setup, chunk_tokens: int) -> None:
    tokenizer, data, lm = setup
    batch = collate(data, list(range(6)))
    sequences = list(zip(batch.prompts, batch.chosen)) + list(zip(batch.prompts, batch.rejected))
    expected_lp, expected_lw = _reference_scores(lm, sequences)
    model = SequenceLogprobs(lm, chunk_tokens=chunk_tokens)
    scores = model(**vars(padded_rows(sequences, tokenizer.pad_token_id, CPU)), with_logweights=True)
    torch.testing.assert_close(scores.logps.double(), expected_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scores.logweights.double(), expected_lw, rtol=1e-5, atol=1e-5)
    lengths = torch.tensor([float(len(c)) for _, c in sequences])
    assert torch.equal(scores.tokens, lengths)
    assert not scores.logweights.requires_grad


def test_chunked_logps_and_gradients_equal_unchunked() -> None:
    """score_tokens in chunks of 5 (recomputed in backward) vs one chunk kept for backward."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=False)
    hidden = torch.randn(53, 16)
    targets = torch.randint(0, 97, (53,))
    results = []
    for chunk in (5, 0):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        logp, logweight, _ = score_tokens(head, h, targets, chunk, with_logweights=True)
        (logp * torch.linspace(-1, 1, 53)).sum().backward()
        results.append((logp.detach(), logweight, h.grad, head.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_forward_modes_agree_on_varied_lengths(setup, varied_batch) -> None:
    """All modes give concatenated's log-probs, token counts, WPO log-weights and gradients."""
    model = SequenceLogprobs(copy.deepcopy(setup[2]))
    base, base_grads = _run(model, "concatenated", varied_batch)
    for mode in FORWARD_MODES:
        out, grads = _run(model, mode, varied_batch)
        _assert_same(out, grads, base, base_grads, 1e-5, mode)


def test_forward_modes_agree_with_eager_attention(setup, varied_batch) -> None:
    """The segment attention falls back to (and agrees with) the model's own eager kernel."""
    lm = copy.deepcopy(setup[2])
    lm.set_attn_implementation("eager")
    model = SequenceLogprobs(lm)
    assert lm.config._attn_implementation == "fsdpo_eager"
    with torch.no_grad():
        base = policy_logps("concatenated", model, varied_batch, 0, CPU, True)
        for mode in ("packed", "prefix_shared"):
            out = policy_logps(mode, model, varied_batch, 0, CPU, True)
            for name in FIELDS:
                torch.testing.assert_close(getattr(out, name), getattr(base, name), rtol=1e-5, atol=1e-5)


def _fsdp_against_plain(setup, batch, world, parallel: ParallelConfig):
    """fp32 unsharded concatenated log-probs and gradients, then for every mode those of a
    one-rank FSDP2 copy built with `parallel` (gradients gathered to full tensors)."""
    from engine.parallel import parallelize

    base, base_grads = _run(SequenceLogprobs(copy.deepcopy(setup[2])), "concatenated", batch)
    sharded = parallelize(SequenceLogprobs(copy.deepcopy(setup[2])), parallel, data_mesh(world), world.device)
    for mode in FORWARD_MODES:
        out, grads = _run(sharded, mode, batch)
        grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
        yield mode, out, grads, base, base_grads


def test_forward_modes_agree_under_fsdp_with_activation_checkpointing(setup, varied_batch, world) -> None:
    """One-rank FSDP2 with every block checkpointed (the segments travel into recomputation)."""
    parallel = ParallelConfig(activation_checkpointing="full")
    for mode, out, grads, base, base_grads in _fsdp_against_plain(setup, varied_batch, world, parallel):
        _assert_same(out, grads, base, base_grads, 1e-5, f"fsdp+ac {mode}")


def test_shared_prefix_layout() -> None:
    """Pair 0: prompt [10, 11], chosen [20, 21, 22], rejected [30]; pair 1: prompt [12],
    chosen [23], rejected [31, 32]. Row: 10 11 20 21 22 30 | 12 23 31 32, positions
    0 1 2 3 4 2 | 0 1 1 2 (rejected continues from the prompt's end). Scored (position ->
    target, sequence): 1->20, 2->21, 3->22 (chosen 0), 1->30 (rejected 0 = sequence 2);
    6->23 (chosen 1), 6->31, 8->32 (rejected 1 = sequence 3)."""
    batch = PairBatch(
        torch.arange(2),
        torch.ones(2, dtype=torch.bool),
        [[10, 11], [12]],
        [[20, 21, 22], [23]],
        [[30], [31, 32]],
    )
    inputs = shared_prefix_row(batch, CPU)
    assert inputs.input_ids.tolist() == [[10, 11, 20, 21, 22, 30, 12, 23, 31, 32]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 1, 2]]
    scored = sorted(
        zip(inputs.score_positions.tolist(), inputs.score_targets.tolist(), inputs.score_sequences.tolist())
    )
    assert scored == sorted(
        [(1, 20, 0), (2, 21, 0), (3, 22, 0), (1, 30, 2), (6, 23, 1), (6, 31, 3), (8, 32, 3)]
    )
    assert inputs.num_sequences == 4
    assert inputs.segments.blocks == [
        (0, 5, ((0, 5),)),
        (5, 6, ((0, 2), (5, 6))),
        (6, 8, ((6, 8),)),
        (8, 10, ((6, 7), (8, 10))),
    ]


def test_segment_attention_equals_a_dense_mask_with_gqa() -> None:
    """Block attention (4 query heads, 2 kv heads) equals sdpa with the dense boolean mask of
    the same pattern: per-sequence causal, and rejected seeing its prompt but not chosen."""
    torch.manual_seed(0)
    segments = AttentionSegments.for_shared_prefix([(3, 4, 2), (1, 2, 5)])
    n = segments.length
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for start, stop, spans in segments.blocks:
        keys = [i for a, b in spans for i in range(a, b)]
        for j, query in enumerate(range(start, stop)):
            for i, key in enumerate(keys):
                allowed[query, key] = i <= len(keys) - (stop - start) + j
    # spot checks of the pattern: rejected (row 7) sees prompt 0-2 and itself, not chosen 3-6
    assert allowed[7].nonzero().flatten().tolist() == [0, 1, 2, 7]
    assert allowed[6].nonzero().flatten().tolist() == list(range(7))
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed
    ).transpose(1, 2)
    got = segment_attention(torch.nn.Module(), q, k, v, segments)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert segments.visible_pairs() == int(allowed.sum())


@pytest.mark.slow
def test_compiled_blocks_match_eager(setup, world) -> None:
    """parallel.compile: per-block torch.compile after fully_shard gives the eager log-probs in
    every forward mode."""
    from engine.parallel import parallelize

    tokenizer, data, lm = setup
    batch = collate(data, list(range(4)))
    eager_model = SequenceLogprobs(copy.deepcopy(lm))
    compiled_model = parallelize(
        SequenceLogprobs(copy.deepcopy(lm)), ParallelConfig(compile=True), data_mesh(world), world.device
    )
    with torch.no_grad():
        for mode in FORWARD_MODES:
            eager = policy_logps(mode, eager_model, batch, tokenizer.pad_token_id, CPU)
            compiled = policy_logps(mode, compiled_model, batch, tokenizer.pad_token_id, CPU)
            for name in ("chosen_logps", "rejected_logps"):
                torch.testing.assert_close(
                    getattr(compiled, name), getattr(eager, name), rtol=1e-5, atol=1e-5, msg=f"{mode}: {name}"
                )


def test_forward_modes_in_bf16_under_fsdp(setup, varied_batch, world) -> None:
    """bf16 compute (as on GPUs; CPU runs it when asked): every mode runs, and its log-probs
    (fp32 out of an fp32 log-softmax; measured within 6e-4 relative) and gradients (within 3% of
    the largest) stay within bf16 rounding of the fp32 ones."""
    parallel = ParallelConfig(mixed_precision="bf16")
    for mode, out, grads, base, base_grads in _fsdp_against_plain(setup, varied_batch, world, parallel):
        assert out.chosen_logps.dtype == torch.float32
        assert (out.chosen_logps.detach() != base.chosen_logps).any(), "bf16 was not applied"
        _assert_same(out, grads, base, base_grads, 5e-3, f"bf16 {mode}", grad_rtol=5e-2)


def test_the_forward_mode_registry_is_the_schema_and_the_readme(varied_batch) -> None:
    """One registry entry is a whole forward mode: its facts match what its layout builds, the
    recipe accepts exactly its names, and the README lists every one."""
    from engine.config import TrainingConfig
    from engine.recipe import reference_doc

    assert TrainingConfig().forward_mode in FORWARD_MODES
    lengths = [
        (len(p), len(c), len(r))
        for p, c, r in zip(varied_batch.prompts, varied_batch.chosen, varied_batch.rejected)
    ]
    for mode in FORWARD_MODES.values():
        inputs = mode.layout(varied_batch, 0, torch.device("cpu"))
        assert mode.forwards(lengths) == [x.computed_tokens for x in inputs]
        assert mode.padding_free == all(x.attention_mask is None for x in inputs)
        real = sum(x.real_tokens for x in inputs)
        assert real == int(mode.real_positions(lengths).sum())
        assert mode.shares_prompt == (real == sum(map(sum, lengths)))
        if mode.padding_free:
            assert mode.pair_positions(lengths).tolist() == [mode.forwards([t])[0] for t in lengths]
        else:
            with pytest.raises(ValueError):
                mode.pair_positions(lengths)
    row = next(line for line in reference_doc().splitlines() if line.startswith("| `training.forward_mode`"))
    assert row.startswith(
        "| `training.forward_mode` | " + " | ".join(f'"{n}"' for n in FORWARD_MODES) + " | `"
    )
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Forward modes (`training.forward_mode`)")[1].split("\n### ")[0]
    assert all(f"- `{n}`" in section for n in FORWARD_MODES)


def test_one_padding_rule_for_data_stats_and_the_bench(setup) -> None:
    """`padding_fraction` (data_stats.json) is `Work.padding_fraction` (the bench's padding
    column) of the sampler's micro-batches over an epoch: one method, not two."""
    from engine.data import GlobalBatchSampler
    from engine.forward import Work, forward_work, padding_fraction

    data = setup[1]
    sampler = GlobalBatchSampler(len(data), 8, 2, 0, 1, seed=3)
    for mode in FORWARD_MODES:
        work = Work()
        for step in range(sampler.steps_per_epoch):
            for micro in sampler.micro_batches(step):
                work += forward_work(mode, data.lengths()[micro])
        assert padding_fraction(data, 2, mode, global_batch_size=8, seed=3) == pytest.approx(
            work.padding_fraction
        )
        assert (work.padding_fraction == 0) == FORWARD_MODES[mode].padding_free
