"""Per-sequence log-probs: forward modes agree, and the chunked head equals full-logit math."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from engine.config import DataConfig, DataSource, ModelConfig, ParallelConfig
from engine.data import build_dataset, collate
from engine.forward import FORWARD_MODES, SequenceLogprobs, padded_rows, policy_logps
from engine.model import build_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, small_data: dict):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    data = build_dataset([DataSource(path=str(small_data["train"]))], tokenizer, DataConfig(max_length=64), 0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return tokenizer, data, lm


def _reference_scores(lm, sequences, pad_id):
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


@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_chunked_logps_and_logweights_match_float64_full_logits(setup, chunk_tokens: int) -> None:
    tokenizer, data, lm = setup
    batch = collate(data, list(range(6)))
    sequences = list(zip(batch.prompts, batch.chosen)) + list(zip(batch.prompts, batch.rejected))
    expected_lp, expected_lw = _reference_scores(lm, sequences, tokenizer.pad_token_id)
    model = SequenceLogprobs(lm, chunk_tokens=chunk_tokens)
    scores = model(**vars(padded_rows(sequences, tokenizer.pad_token_id, CPU)), with_logweights=True)
    torch.testing.assert_close(scores.logps.double(), expected_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scores.logweights.double(), expected_lw, rtol=1e-5, atol=1e-5)
    lengths = torch.tensor([float(len(c)) for _, c in sequences])
    assert torch.equal(scores.tokens, lengths)
    assert not scores.logweights.requires_grad


def test_chunked_gradients_equal_unchunked(setup) -> None:
    tokenizer, data, lm = setup
    batch = collate(data, list(range(4)))
    grads = []
    for chunk in (5, 10_000):
        model = SequenceLogprobs(copy.deepcopy(lm), chunk_tokens=chunk)
        logps = policy_logps("concatenated", model, batch, tokenizer.pad_token_id, CPU)
        (logps.chosen_logps.sum() - 0.5 * logps.rejected_logps.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-6)


def test_forward_modes_agree(setup) -> None:
    tokenizer, data, lm = setup
    batch = collate(data, list(range(8)))
    model = SequenceLogprobs(lm)
    with torch.no_grad():
        results = {m: policy_logps(m, model, batch, tokenizer.pad_token_id, CPU, True) for m in FORWARD_MODES}
    base = results["concatenated"]
    for mode, other in results.items():
        for field in ("chosen_logps", "rejected_logps", "chosen_tokens", "chosen_logweights"):
            torch.testing.assert_close(
                getattr(other, field), getattr(base, field), rtol=1e-6, atol=1e-6, msg=mode
            )


def test_fsdp_wrapped_forward_matches_plain(setup, world) -> None:
    """One-rank FSDP2 (the real parallelize path) gives the plain model's log-probs."""
    from engine.parallel import parallelize

    tokenizer, data, lm = setup
    batch = collate(data, list(range(4)))
    with torch.no_grad():
        plain = policy_logps(
            "concatenated", SequenceLogprobs(copy.deepcopy(lm)), batch, tokenizer.pad_token_id, CPU
        )
        sharded = parallelize(
            SequenceLogprobs(copy.deepcopy(lm)),
            ParallelConfig(activation_checkpointing="full"),
            world.mesh,
            world.device,
        )
        fsdp = policy_logps("concatenated", sharded, batch, tokenizer.pad_token_id, CPU)
    torch.testing.assert_close(fsdp.chosen_logps, plain.chosen_logps, rtol=1e-6, atol=1e-6)
