"""Per-sequence log-probabilities of chosen and rejected completions.

`SequenceLogprobs` wraps the causal LM and is the FSDP root: its forward runs the decoder, then
scores only the positions whose next token is a completion token, through the LM head in chunks
(each chunk's logits recomputed in backward), with log-softmax in fp32. Full-vocabulary logits
for every position are never materialised, and prompt and padding positions never reach the
head. Forward modes (`concatenated`, `separate`) lay a micro-batch of pairs out as model inputs
and are registered by name in `FORWARD_MODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.data import PairBatch
from engine.losses import PreferenceLogps


@dataclass
class SequenceScores:
    """Per-sequence sums over scored tokens, shape [S] each (fp32)."""

    logps: Tensor  # summed log p(token)
    tokens: Tensor  # number of scored tokens
    logweights: Tensor | None  # WPO: mean of log p(y_t) - log sum_v p(v)^2, detached


class SequenceLogprobs(nn.Module):
    """A causal LM whose forward returns per-sequence completion log-probs.

    Inputs are laid out by a forward mode: `input_ids` [R, T] rows (padded or packed), and for
    each position t the id of the token at t + 1 (`next_ids`) and the sequence it scores
    (`sequence_index`, -1 where nothing is scored). Rows and sequences need not coincide, so
    padded and packed layouts share this one function.
    """

    def __init__(self, causal_lm: nn.Module, chunk_tokens: int = 4096) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        next_ids: Tensor,
        sequence_index: Tensor,
        num_sequences: int,
        with_logweights: bool = False,
    ) -> SequenceScores:
        decoder = self.causal_lm.get_decoder()
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        scored = sequence_index >= 0
        hidden = hidden[scored]  # [N, H]: only positions that predict a completion token
        targets = next_ids[scored]
        owner = sequence_index[scored]

        head = self.causal_lm.get_output_embeddings()
        softcap = getattr(self.causal_lm.config, "final_logit_softcapping", None)
        token_logps, token_logweights = [], []
        for h, y in zip(hidden.split(self.chunk_tokens), targets.split(self.chunk_tokens)):
            if torch.is_grad_enabled():
                lp, lw = checkpoint(_score_chunk, head, h, y, softcap, with_logweights, use_reentrant=False)
            else:
                lp, lw = _score_chunk(head, h, y, softcap, with_logweights)
            token_logps.append(lp)
            token_logweights.append(lw)

        zeros = torch.zeros(num_sequences, dtype=torch.float32, device=input_ids.device)
        logps = zeros.index_add(0, owner, torch.cat(token_logps)) if token_logps else zeros
        tokens = torch.bincount(owner, minlength=num_sequences).to(torch.float32)
        logweights = None
        if with_logweights:
            summed = zeros.index_add(0, owner, torch.cat(token_logweights).detach())
            logweights = summed / tokens.clamp(min=1)
        return SequenceScores(logps, tokens, logweights)


def _score_chunk(
    head: nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None, with_logweights: bool
) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_logweights:
        return logp, logp.new_zeros(())
    # log sum_v p(v)^2 = logsumexp(2 z) - 2 logsumexp(z)
    return logp, logp - (torch.logsumexp(2 * logits, dim=-1) - 2 * lse)


# ----------------------------------------------------------------------------------------------
# Forward modes: how a micro-batch of pairs is laid out


@dataclass
class ModelInputs:
    input_ids: Tensor
    attention_mask: Tensor | None
    position_ids: Tensor | None
    next_ids: Tensor
    sequence_index: Tensor
    num_sequences: int


def padded_rows(
    sequences: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> ModelInputs:
    """One right-padded row per (prompt, completion); row i scores sequence i's completion."""
    lengths = [len(p) + len(c) for p, c in sequences]
    width = max(lengths)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    sequence_index = torch.full((rows, width), -1, dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        tokens = prompt + completion
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        attention_mask[i, : len(tokens)] = 1
        # position t predicts token t + 1: score positions len(prompt)-1 .. len(tokens)-2
        sequence_index[i, len(prompt) - 1 : len(tokens) - 1] = i
    next_ids = torch.cat([input_ids[:, 1:], torch.full((rows, 1), pad_id)], dim=1)
    return ModelInputs(
        input_ids.to(device),
        attention_mask.to(device),
        None,
        next_ids.to(device),
        sequence_index.to(device),
        rows,
    )


def _score(model: nn.Module, inputs: ModelInputs, with_logweights: bool) -> SequenceScores:
    return model(
        inputs.input_ids,
        inputs.attention_mask,
        inputs.position_ids,
        inputs.next_ids,
        inputs.sequence_index,
        inputs.num_sequences,
        with_logweights,
    )


ForwardMode = Callable[[nn.Module, PairBatch, int, torch.device, bool], PreferenceLogps]
FORWARD_MODES: dict[str, ForwardMode] = {}


def register(name: str) -> Callable[[ForwardMode], ForwardMode]:
    def add(fn: ForwardMode) -> ForwardMode:
        FORWARD_MODES[name] = fn
        return fn

    return add


@register("concatenated")
def concatenated_forward(
    model: nn.Module, batch: PairBatch, pad_id: int, device: torch.device, with_logweights: bool
) -> PreferenceLogps:
    """Chosen and rejected stacked into one padded batch of 2B rows: one forward, one
    all-gather per block under FSDP."""
    sequences = list(zip(batch.prompts, batch.chosen)) + list(zip(batch.prompts, batch.rejected))
    scores = _score(model, padded_rows(sequences, pad_id, device), with_logweights)
    b = len(batch)
    lw = scores.logweights
    return PreferenceLogps(
        chosen_logps=scores.logps[:b],
        rejected_logps=scores.logps[b:],
        chosen_tokens=scores.tokens[:b],
        rejected_tokens=scores.tokens[b:],
        chosen_logweights=None if lw is None else lw[:b],
        rejected_logweights=None if lw is None else lw[b:],
    )


@register("separate")
def separate_forward(
    model: nn.Module, batch: PairBatch, pad_id: int, device: torch.device, with_logweights: bool
) -> PreferenceLogps:
    """Two forwards of B rows (chosen, then rejected): lower peak activation memory."""
    chosen = _score(
        model, padded_rows(list(zip(batch.prompts, batch.chosen)), pad_id, device), with_logweights
    )
    rejected = _score(
        model, padded_rows(list(zip(batch.prompts, batch.rejected)), pad_id, device), with_logweights
    )
    return PreferenceLogps(
        chosen_logps=chosen.logps,
        rejected_logps=rejected.logps,
        chosen_tokens=chosen.tokens,
        rejected_tokens=rejected.tokens,
        chosen_logweights=chosen.logweights,
        rejected_logweights=rejected.logweights,
    )


def policy_logps(
    mode: str,
    model: nn.Module,
    batch: PairBatch,
    pad_id: int,
    device: torch.device,
    with_logweights: bool = False,
) -> PreferenceLogps:
    return FORWARD_MODES[mode](model, batch, pad_id, device, with_logweights)
