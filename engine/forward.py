"""Per-sequence log-probabilities of chosen and rejected completions.

`SequenceLogprobs` wraps the causal LM and is the FSDP root: its forward runs the decoder, then
scores only the positions that predict a completion token, through the LM head in chunks (each
chunk's logits recomputed in backward), with log-softmax in fp32. Full-vocabulary logits for
every position are never materialised, and prompt and padding positions never reach the head.

Forward modes lay a micro-batch of B pairs out as model inputs and are registered by name in
`FORWARD_MODES`, each with the facts the engine reads about it (`ForwardMode`: padding-free,
shares the prompt, positions per forward), from which `forward_work` counts what a micro-batch
computes and `padding_fraction` the padding a mode pays:

| mode            | rows                          | positions computed         | attention                      |
|-----------------|-------------------------------|----------------------------|--------------------------------|
| `concatenated`  | 2B padded rows                | 2B x longest sequence      | causal, padding masked         |
| `separate`      | B padded rows, twice          | B x (longest c + longest r)| causal, padding masked         |
| `packed`        | 1 row of 2B sequences         | sum of (2 prompt + c + r)  | causal within each sequence    |
| `prefix_shared` | 1 row of B prompt+c+r         | sum of (prompt + c + r)    | rejected sees prompt, not c    |

(c, r: chosen and rejected completions, with their prompt in the padded modes.)
All give the same log-probs (fp32, up to kernel rounding). The packed modes' attention is in
engine/attention.py.

Asked for (`shared_length=True`: LD-DPO's `loss.ld_alpha`), a layout also flags each scored token
that lies within its pair's shared length l = min(chosen tokens, rejected tokens), counted from
the completion's start, and the forward adds a second per-sequence sum over the flagged tokens.
The layout knows both lengths of each pair on the host, so the flags cost the device no read.

A live reference (`reference.mode = "live"`) runs the same forward on the same inputs under
no_grad (`reference_scores`). For TDPO's token-level KL it also returns its final hidden states
at the scored positions, and the policy's forward takes them with the reference's LM head: each
chunk of the head pass then computes both models' next-token distributions and sums
KL(ref || policy) per token into each sequence (`SequenceScores.token_kl`). Only one chunk of
[chunk tokens, vocab] logits of each model exists at a time, recomputed in backward like the
policy's own (so the reference's head must stay gathered from forward to backward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from engine.attention import KWARG, AttentionSegments, enable_segment_attention, segmented_forward
from engine.data import GlobalBatchSampler, PairBatch, PreferenceDataset
from engine.errors import UserError
from engine.losses import PreferenceLogps
from engine.sequence_parallel import SequenceGroup, check_heads


@dataclass
class SequenceScores:
    """Per-sequence sums over scored tokens, shape [S] each (fp32)."""

    logps: Tensor  # summed log p(token)
    tokens: Tensor  # number of scored tokens
    logweights: Tensor | None  # WPO: mean of log p(y_t) - log sum_v p(v)^2, detached
    shared_logps: Tensor | None = None  # LD-DPO: summed over the pair's shared length
    token_kl: Tensor | None = None  # TDPO: summed KL(ref || this model) of each scored token
    hidden: Tensor | None = None  # [N, H] final hidden states of the scored positions (asked for)


class SequenceLogprobs(nn.Module):
    """A causal LM whose forward returns per-sequence completion log-probs.

    Inputs are laid out by a forward mode: `input_ids` [R, T] rows (padded or packed), three
    flat index tensors of the N scored (position, target) pairs: `score_positions` (index into
    the R x T positions, row-major), `score_targets` (the token id that position predicts) and
    `score_sequences` (the sequence whose log-prob it adds to), and `sequence_tokens` [S] long
    (an integer, so that FSDP's input casting leaves it alone), each sequence's count of scored
    tokens (the layout knows it on the host, so the device never
    counts and the host never waits). Rows and sequences need not coincide and one position may
    score several sequences (prefix sharing: the last prompt position predicts both completions'
    first tokens), so all layouts share this one function. `score_in_shared` [N] bool, when
    given, flags the scored tokens within their pair's shared length: their per-sequence sum is
    `SequenceScores.shared_logps`. `return_hidden` adds the scored positions' final hidden
    states (`SequenceScores.hidden`: a live reference's, for TDPO); `reference_hidden` with
    `reference_head` (another model's hidden states at the same positions and its LM head) adds
    each sequence's summed token-level KL from that model (`SequenceScores.token_kl`).

    `chunk_tokens` positions go through the LM head at a time, each chunk's logits recomputed in
    backward; 0 scores all positions in one chunk and keeps its logits for backward (the
    unchunked reference, for measurements). `attention_kernel` forces the packed modes' kernel
    (`engine.attention.KERNELS`; "auto" picks by device and what is installed).
    """

    def __init__(
        self,
        causal_lm: nn.Module,
        chunk_tokens: int = 1024,
        attention_kernel: str = "auto",
        sequence: SequenceGroup | None = None,
    ) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.chunk_tokens = chunk_tokens
        self.attention_kernel = attention_kernel
        if sequence is not None:
            check_heads(causal_lm.config, sequence.size)
        self.sequence = sequence  # layouts give this rank its share of each row (`shard_row`)
        enable_segment_attention(causal_lm)  # padded forwards keep the configured kernel

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        score_positions: Tensor,
        score_targets: Tensor,
        score_sequences: Tensor,
        sequence_tokens: Tensor,
        with_logweights: bool = False,
        segments: AttentionSegments | None = None,
        score_in_shared: Tensor | None = None,
        return_hidden: bool = False,
        reference_hidden: Tensor | None = None,
        reference_head: nn.Module | None = None,
    ) -> SequenceScores:
        decoder = self.causal_lm.get_decoder()
        if segments is None:
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        else:
            segments.prepare(input_ids.device, self.attention_kernel)  # outside any compiled block
            with segmented_forward():
                hidden = decoder(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False, **{KWARG: segments}
                ).last_hidden_state
            if not segments.used:  # every rank of a sequence group finds it in the same forward
                fix = (
                    'training.forward_mode = "concatenated"'
                    if segments.sequence is None
                    else "parallel.sequence_parallel = 1 (the all-to-all lives in that attention)"
                )
                raise UserError(
                    f"model.path: {type(self.causal_lm).__name__} does not route attention through "
                    f"transformers' AttentionInterface, so it cannot run packed rows; use {fix}"
                )
        hidden = hidden.flatten(0, 1).index_select(0, score_positions)  # [N, H]
        reference = None if reference_head is None else (reference_head, reference_hidden)
        token_logps, token_logweights, token_kl = score_tokens(
            self.causal_lm.get_output_embeddings(),
            hidden,
            score_targets,
            self.chunk_tokens,
            with_logweights,
            getattr(self.causal_lm.config, "final_logit_softcapping", None),
            reference,
        )

        tokens = sequence_tokens.to(torch.float32)
        zeros = torch.zeros_like(tokens)
        sums = {"logps": zeros.index_add(0, score_sequences, token_logps)}
        if token_kl is not None:
            sums["kl"] = zeros.index_add(0, score_sequences, token_kl)
        if with_logweights:
            sums["logweights"] = zeros.index_add(0, score_sequences, token_logweights.detach())
        if score_in_shared is not None:
            sums["shared"] = zeros.index_add(
                0, score_sequences, token_logps.masked_fill(~score_in_shared, 0.0)
            )
        group = None if segments is None else segments.sequence
        if group is not None:  # sequences span the group's ranks: one sum of every partial sum
            summed = group.sum(torch.stack(list(sums.values())))
            # each its own tensor, not a view of `summed` (FSDP hooks the outputs for backward)
            sums = {name: summed[i].clone() for i, name in enumerate(sums)}
        logps, kl, shared = sums["logps"], sums.get("kl"), sums.get("shared")
        logweights = sums["logweights"] / tokens.clamp(min=1) if with_logweights else None
        return SequenceScores(
            logps, tokens, logweights, shared, kl, hidden.detach() if return_hidden else None
        )


def score_tokens(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    chunk_tokens: int,
    with_logweights: bool = False,
    softcap: float | None = None,
    reference: tuple[nn.Module, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """log p(target) [N] fp32 of each hidden state [N, H] through `head`, WPO's per-token
    log-weights (zeros unless asked) and, with `reference` (another model's LM head and its hidden
    states [N, H] at the same positions), each token's KL(reference || this model) [N] (else
    None), `chunk_tokens` rows at a time with each chunk's logits recomputed in backward (0 = one
    chunk, logits kept for backward)."""
    size = chunk_tokens if chunk_tokens > 0 else max(hidden.shape[0], 1)
    ref_head, ref_hidden = reference if reference is not None else (None, None)
    ref_chunks = ref_hidden.split(size) if ref_hidden is not None else [None] * len(hidden.split(size))
    chunks = zip(hidden.split(size), targets.split(size), ref_chunks)
    if chunk_tokens <= 0 or not torch.is_grad_enabled():
        parts = [_score_chunk(head, h, y, softcap, with_logweights, ref_head, r) for h, y, r in chunks]
    else:
        parts = [
            checkpoint(_score_chunk, head, h, y, softcap, with_logweights, ref_head, r, use_reentrant=False)
            for h, y, r in chunks
        ]
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty if reference is not None else None
    kl = torch.cat([p[2] for p in parts]) if reference is not None else None
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), kl


def _logits(head: nn.Module, hidden: Tensor, softcap: float | None) -> Tensor:
    logits = head(hidden).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _score_chunk(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    softcap: float | None,
    with_logweights: bool,
    ref_head: nn.Module | None = None,
    ref_hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    logits = _logits(head, hidden, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    zeros = logp.new_zeros(logp.shape)
    kl = zeros
    if ref_head is not None:
        with torch.no_grad():  # the reference is frozen
            ref_logits = _logits(ref_head, ref_hidden, softcap)
            ref_logp = ref_logits - torch.logsumexp(ref_logits, dim=-1, keepdim=True)
        # KL(ref || pi) = sum_v p_ref(v) (log p_ref(v) - log pi(v)); both log-softmaxes written
        # alike, so equal models give exactly 0
        kl = (ref_logp.exp() * (ref_logp - (logits - lse.unsqueeze(-1)))).sum(-1)
    if not with_logweights:
        return logp, zeros, kl
    # log sum_v p(v)^2 = logsumexp(2 z) - 2 logsumexp(z)
    return logp, logp - (torch.logsumexp(2 * logits, dim=-1) - 2 * lse), kl


# ----------------------------------------------------------------------------------------------
# Forward modes: how a micro-batch of pairs is laid out


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without making the host wait: on CUDA staged in pinned memory
    and copied with `non_blocking=True` (ordered on the current stream; the caching host
    allocator keeps the pinned block until the copy is done), elsewhere `tensor.to(device)` (on
    the CPU the tensor itself). A pageable copy would wait for the stream to drain first."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class ModelInputs:
    """The arguments of `SequenceLogprobs.forward` (call it as `model(**vars(inputs))`), built
    on the host and copied to the device without waiting (`to_device`)."""

    input_ids: Tensor
    attention_mask: Tensor | None
    position_ids: Tensor | None
    score_positions: Tensor
    score_targets: Tensor
    score_sequences: Tensor
    sequence_tokens: Tensor  # [S] long: scored tokens of each sequence
    segments: AttentionSegments | None = None
    score_in_shared: Tensor | None = None  # [N] bool: within the pair's shared length (LD-DPO)

    @property
    def num_sequences(self) -> int:
        return self.sequence_tokens.shape[0]

    @property
    def computed_tokens(self) -> int:
        """Positions run through the model, padding included."""
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        """Positions run through the model that are not padding."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())


class _Scores:
    """Collects (position, target, sequence) triples for one layout, and with `shared_lengths`
    (each sequence's pair's shared length) the flags of the tokens within it."""

    def __init__(self, shared_lengths: list[int] | None = None) -> None:
        self.positions: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.sequences: list[Tensor] = []
        self.counts: dict[int, int] = {}  # sequence -> scored tokens
        self.shared_lengths = shared_lengths
        self.in_shared: list[Tensor] = []

    def add(self, positions: Tensor, targets: list[int], sequence: int) -> None:
        """Score `targets`, a completion's tokens in order from its start, at `positions`."""
        self.positions.append(positions)
        self.targets.append(torch.tensor(targets, dtype=torch.long))
        self.sequences.append(torch.full((len(targets),), sequence, dtype=torch.long))
        self.counts[sequence] = self.counts.get(sequence, 0) + len(targets)
        if self.shared_lengths is not None:
            self.in_shared.append(torch.arange(len(targets)) < self.shared_lengths[sequence])

    def shared_flags(self, device: torch.device) -> Tensor | None:
        """`ModelInputs.score_in_shared` on `device`, or None when no shared lengths were given."""
        return None if self.shared_lengths is None else to_device(torch.cat(self.in_shared), device)

    def tensors(self, device: torch.device, num_sequences: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Positions, targets and sequences of the scored tokens, and each of the
        `num_sequences` sequences' token count, on `device`."""
        counts = torch.tensor([self.counts.get(s, 0) for s in range(num_sequences)], dtype=torch.long)
        flat = [torch.cat(x) for x in (self.positions, self.targets, self.sequences)]
        return tuple(to_device(t, device) for t in (*flat, counts))


def _check_prompt(prompt: list[int]) -> None:
    if not prompt:
        raise ValueError(
            "a pair has an empty prompt: its first completion token has no position to predict it"
        )


def padded_rows(
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
    shared_lengths: list[int] | None = None,
) -> ModelInputs:
    """One right-padded row per (prompt, completion); row i scores sequence i's completion
    (and flags its first `shared_lengths[i]` tokens, when given)."""
    width = max(len(p) + len(c) for p, c in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    scores = _Scores(shared_lengths)
    for i, (prompt, completion) in enumerate(sequences):
        _check_prompt(prompt)
        tokens = prompt + completion
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        attention_mask[i, : len(tokens)] = 1
        # position t predicts token t + 1: positions len(prompt)-1 .. len(tokens)-2
        scores.add(i * width + len(prompt) - 1 + torch.arange(len(completion)), completion, i)
    return ModelInputs(
        to_device(input_ids, device),
        to_device(attention_mask, device),
        None,
        *scores.tensors(device, rows),
        score_in_shared=scores.shared_flags(device),
    )


def packed_row(
    sequences: list[tuple[list[int], list[int]]],
    device: torch.device,
    shared_lengths: list[int] | None = None,
) -> ModelInputs:
    """All (prompt, completion) sequences back to back in one row, positions restarting per
    sequence, attention confined to each sequence; sequence i scores its completion (and flags
    its first `shared_lengths[i]` tokens, when given)."""
    ids, positions, lengths = [], [], []
    scores = _Scores(shared_lengths)
    start = 0
    for i, (prompt, completion) in enumerate(sequences):
        _check_prompt(prompt)
        n = len(prompt) + len(completion)
        ids += prompt + completion
        positions.append(torch.arange(n))
        lengths.append(n)
        scores.add(start + len(prompt) - 1 + torch.arange(len(completion)), completion, i)
        start += n
    return ModelInputs(
        to_device(torch.tensor([ids]), device),
        None,
        to_device(torch.cat(positions).unsqueeze(0), device),
        *scores.tensors(device, len(sequences)),
        AttentionSegments.for_sequences(lengths),
        scores.shared_flags(device),
    )


def shared_prefix_row(batch: PairBatch, device: torch.device, shared_length: bool = False) -> ModelInputs:
    """One row of `[prompt | chosen | rejected]` per pair, back to back. Rejected positions
    continue from the prompt's end and attend to the prompt, not to chosen; the last prompt
    position scores both completions' first tokens. Pair i's chosen is sequence i, its
    rejected sequence B + i (as in the concatenated layout)."""
    b = len(batch)
    ids, positions, triples = [], [], []
    scores = _Scores(2 * pair_shared_lengths(batch) if shared_length else None)
    start = 0
    for i, (prompt, chosen, rejected) in enumerate(zip(batch.prompts, batch.chosen, batch.rejected)):
        _check_prompt(prompt)
        p, c, r = len(prompt), len(chosen), len(rejected)
        ids += prompt + chosen + rejected
        positions += [torch.arange(p + c), p + torch.arange(r)]
        triples.append((p, c, r))
        last_prompt = start + p - 1
        scores.add(last_prompt + torch.arange(c), chosen, i)
        # (r = 0: an unpaired example without a KL sequence scores nothing there)
        rejected_positions = torch.cat(
            [torch.tensor([last_prompt]), start + p + c + torch.arange(max(r - 1, 0))]
        )[:r]
        scores.add(rejected_positions, rejected, b + i)
        start += p + c + r
    return ModelInputs(
        to_device(torch.tensor([ids]), device),
        None,
        to_device(torch.cat(positions).unsqueeze(0), device),
        *scores.tensors(device, 2 * b),
        AttentionSegments.for_shared_prefix(triples),
        scores.shared_flags(device),
    )


def as_one_row(inputs: ModelInputs) -> ModelInputs:
    """A padded layout's R right-padded rows of width W (`padded_rows`, on the host) as one row
    of the same R x W positions, padding included: each row's tokens one causal block, its
    padding another that sees only itself, positions restarting at each row, as the padded
    forward's are. The scored positions are already flat (row i's position t is i W + t), so
    every real token's log-prob is the padded forward's."""
    rows, width = inputs.input_ids.shape
    lengths = inputs.attention_mask.sum(1).tolist()
    return replace(
        inputs,
        input_ids=inputs.input_ids.reshape(1, rows * width),
        attention_mask=None,
        position_ids=torch.arange(width).repeat(rows).unsqueeze(0),
        segments=AttentionSegments.for_sequences([part for n in lengths for part in (n, width - n)]),
    )


def shard_row(inputs: ModelInputs, group: SequenceGroup, device: torch.device) -> ModelInputs:
    """This rank's share of a layout's row (`inputs`, on the host; a padded layout's rows first
    made one, `as_one_row`) under sequence parallelism, on `device`: the row padded to a multiple
    of `group.size` positions (padding ids and position ids 0, attending only to themselves:
    `AttentionSegments.split_over`), positions [k T/N, (k+1) T/N) of it for the group's k-th
    rank, and the scored tokens at those positions, re-based to the slice. Targets come from the
    whole row; each sequence's token count is the whole row's (its sums are added across the
    group in the forward)."""
    if inputs.segments is None:
        inputs = as_one_row(inputs)
    segments = inputs.segments.split_over(group)
    size = segments.length // group.size
    start = group.rank * size

    def mine(row: Tensor) -> Tensor:
        padded = torch.nn.functional.pad(row, (0, segments.length - row.shape[1]))
        return to_device(padded[:, start : start + size], device)

    local = (inputs.score_positions >= start) & (inputs.score_positions < start + size)
    flags = None if inputs.score_in_shared is None else to_device(inputs.score_in_shared[local], device)
    return ModelInputs(
        mine(inputs.input_ids),
        None,
        mine(inputs.position_ids),
        to_device(inputs.score_positions[local] - start, device),
        to_device(inputs.score_targets[local], device),
        to_device(inputs.score_sequences[local], device),
        to_device(inputs.sequence_tokens, device),
        segments,
        flags,
    )


def score_pairs(
    model: nn.Module,
    inputs: list[ModelInputs],
    with_logweights: bool = False,
    reference: ReferenceScores | None = None,
) -> PreferenceLogps:
    """The per-pair log-probs of a micro-batch laid out as `inputs` (a layout's output: the B
    chosen then the B rejected sequences, in order, over one or more forwards). With `reference`
    (a live reference's `reference_scores` of the same inputs) its log-probs fill the `ref_*`
    fields, and its hidden states, when it kept them, give the token-level KL sums."""
    if reference is None or reference.hidden is None:
        parts = [model(**vars(x), with_logweights=with_logweights) for x in inputs]
    else:
        parts = [
            model(
                **vars(x), with_logweights=with_logweights, reference_hidden=h, reference_head=reference.head
            )
            for x, h in zip(inputs, reference.hidden)
        ]
    logps = _pair_logps(_merged(parts), sum(x.num_sequences for x in inputs) // 2)
    if reference is not None:
        ref = reference.logps
        logps.ref_chosen_logps, logps.ref_rejected_logps = ref.chosen_logps, ref.rejected_logps
        logps.ref_chosen_shared_logps = ref.chosen_shared_logps
        logps.ref_rejected_shared_logps = ref.rejected_shared_logps
    return logps


@dataclass
class ReferenceScores:
    """A live reference's forward of a micro-batch (`reference_scores`): its per-pair log-probs
    and, for the token-level KL, each forward's scored hidden states and its LM head."""

    logps: PreferenceLogps
    hidden: list[Tensor] | None = None
    head: nn.Module | None = None


@torch.no_grad()
def reference_scores(
    model: nn.Module, inputs: list[ModelInputs], with_hidden: bool = False
) -> ReferenceScores:
    """The live reference `model`'s scores of a micro-batch laid out as `inputs`, under no_grad;
    `with_hidden` keeps its scored hidden states and names its LM head (TDPO's token-level KL)."""
    parts = [model(**vars(x), return_hidden=with_hidden) for x in inputs]
    logps = _pair_logps(_merged(parts), sum(x.num_sequences for x in inputs) // 2)
    if not with_hidden:
        return ReferenceScores(logps)
    return ReferenceScores(logps, [p.hidden for p in parts], model.causal_lm.get_output_embeddings())


def _merged(parts: list[SequenceScores]) -> SequenceScores:
    """The sequence scores of several forwards, in order, as one (without hidden states)."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return SequenceScores(
        cat("logps"), cat("tokens"), cat("logweights"), cat("shared_logps"), cat("token_kl")
    )


def _pair_logps(scores: SequenceScores, b: int) -> PreferenceLogps:
    """Split 2B sequence scores (chosen first, then rejected) into per-pair tensors."""
    lw, shared, kl = scores.logweights, scores.shared_logps, scores.token_kl
    return PreferenceLogps(
        chosen_logps=scores.logps[:b],
        rejected_logps=scores.logps[b:],
        chosen_tokens=scores.tokens[:b],
        rejected_tokens=scores.tokens[b:],
        chosen_logweights=None if lw is None else lw[:b],
        rejected_logweights=None if lw is None else lw[b:],
        chosen_shared_logps=None if shared is None else shared[:b],
        rejected_shared_logps=None if shared is None else shared[b:],
        chosen_token_kl=None if kl is None else kl[:b],
        rejected_token_kl=None if kl is None else kl[b:],
    )


def both_sequences(batch: PairBatch) -> list[tuple[list[int], list[int]]]:
    """(prompt, chosen) of every pair, then (prompt, rejected) of every pair."""
    return list(zip(batch.prompts, batch.chosen)) + list(zip(batch.prompts, batch.rejected))


def pair_shared_lengths(batch: PairBatch) -> list[int]:
    """Each pair's shared length (LD-DPO): min(chosen tokens, rejected tokens)."""
    return [min(len(c), len(r)) for c, r in zip(batch.chosen, batch.rejected)]


# ----------------------------------------------------------------------------------------------
# The registry: a forward mode is its layout and the facts the rest of the engine reads about it


class Layout(Protocol):
    """Pairs -> model inputs; `shared_length` adds the flags of `ModelInputs.score_in_shared`."""

    def __call__(
        self, batch: PairBatch, pad_id: int, device: torch.device, shared_length: bool = False
    ) -> list[ModelInputs]: ...


Triple = tuple[int, int, int]  # a pair's (prompt, chosen, rejected) token counts


@dataclass(frozen=True)
class ForwardMode:
    """A forward mode: its layout and its facts. The recipe's allowed `training.forward_mode`
    values, token budgets, the reference layout, the FLOP count and the padding statistics all
    read them here, so a new mode is one `register` call."""

    name: str
    layout: Layout  # pairs -> model inputs whose sequences, in order, are the B chosen then the B rejected
    padding_free: bool  # one row without padding: token-budget micro-batches; scores its own reference
    shares_prompt: bool  # each pair's prompt is computed once, for both completions
    forwards: Callable[
        [list[Triple]], list[int]
    ]  # positions of each forward of a micro-batch (padding included)
    doc: str

    def real_positions(self, lengths: np.ndarray) -> np.ndarray:
        """[N] positions of each pair that are not padding, from [N, 3] (prompt, chosen, rejected)
        lengths (`PreferenceDataset.lengths()`): the prompt twice unless it is shared."""
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 3)
        return lengths.sum(axis=1) + (0 if self.shares_prompt else lengths[:, 0])

    def pair_positions(self, lengths: np.ndarray) -> np.ndarray:
        """[N] positions each pair takes in a padding-free row: the unit of `micro_batch_tokens`."""
        if not self.padding_free:
            raise ValueError(
                f"token-budget micro-batches need a padding-free forward mode, not {self.name!r}"
            )
        return self.real_positions(lengths)

    def inputs(
        self,
        batch: PairBatch,
        pad_id: int,
        device: torch.device,
        shared_length: bool = False,
        sequence: SequenceGroup | None = None,
    ) -> list[ModelInputs]:
        """`batch` laid out on `device`; with `sequence` (`SequenceLogprobs.sequence`) laid out on
        the host, then this rank's share of each row (`shard_row`)."""
        if sequence is None:
            return self.layout(batch, pad_id, device, shared_length)
        host = self.layout(batch, pad_id, torch.device("cpu"), shared_length)
        return [shard_row(x, sequence, device) for x in host]

    def __call__(
        self,
        model: nn.Module,
        batch: PairBatch,
        pad_id: int,
        device: torch.device,
        with_logweights: bool,
        shared_length: bool = False,
    ) -> PreferenceLogps:
        inputs = self.inputs(batch, pad_id, device, shared_length, model.sequence)
        return score_pairs(model, inputs, with_logweights)


FORWARD_MODES: dict[str, ForwardMode] = {}


def register(
    name: str, *, padding_free: bool, shares_prompt: bool, forwards: Callable[[list[Triple]], list[int]]
) -> Callable[[Layout], Layout]:
    """Register `layout` as the forward mode `name`, with its facts (`ForwardMode`)."""

    def add(layout: Layout) -> Layout:
        doc = " ".join((layout.__doc__ or "").split())
        FORWARD_MODES[name] = ForwardMode(name, layout, padding_free, shares_prompt, forwards, doc)
        return layout

    return add


def _widest(triples: list[Triple], completion: int) -> int:
    """The longest prompt + completion (1: chosen, 2: rejected) of a micro-batch's pairs."""
    return max(t[0] + t[completion] for t in triples)


@register(
    "concatenated",
    padding_free=False,
    shares_prompt=False,
    forwards=lambda t: [2 * len(t) * max(_widest(t, 1), _widest(t, 2))],
)
def concatenated_layout(
    batch: PairBatch, pad_id: int, device: torch.device, shared_length: bool = False
) -> list[ModelInputs]:
    """Chosen and rejected stacked into one padded batch of 2B rows: one forward, one
    all-gather per block under FSDP."""
    shared = 2 * pair_shared_lengths(batch) if shared_length else None
    return [padded_rows(both_sequences(batch), pad_id, device, shared)]


@register(
    "separate",
    padding_free=False,
    shares_prompt=False,
    forwards=lambda t: [len(t) * _widest(t, 1), len(t) * _widest(t, 2)],
)
def separate_layout(
    batch: PairBatch, pad_id: int, device: torch.device, shared_length: bool = False
) -> list[ModelInputs]:
    """Two forwards of B rows (chosen, then rejected): lower peak activation memory."""
    shared = pair_shared_lengths(batch) if shared_length else None
    return [
        padded_rows(list(zip(batch.prompts, batch.chosen)), pad_id, device, shared),
        padded_rows(list(zip(batch.prompts, batch.rejected)), pad_id, device, shared),
    ]


@register(
    "packed", padding_free=True, shares_prompt=False, forwards=lambda t: [sum(2 * p + c + r for p, c, r in t)]
)
def packed_layout(
    batch: PairBatch, pad_id: int, device: torch.device, shared_length: bool = False
) -> list[ModelInputs]:
    """All 2B sequences in one row without padding, attention confined to each sequence."""
    shared = 2 * pair_shared_lengths(batch) if shared_length else None
    return [packed_row(both_sequences(batch), device, shared)]


@register(
    "prefix_shared",
    padding_free=True,
    shares_prompt=True,
    forwards=lambda t: [sum(p + c + r for p, c, r in t)],
)
def prefix_shared_layout(
    batch: PairBatch, pad_id: int, device: torch.device, shared_length: bool = False
) -> list[ModelInputs]:
    """One `[prompt | chosen | rejected]` sequence per pair, packed: each prompt computed once
    (rejected attends to the prompt, not to chosen)."""
    return [shared_prefix_row(batch, device, shared_length)]


def policy_logps(
    mode: str,
    model: nn.Module,
    batch: PairBatch,
    pad_id: int,
    device: torch.device,
    with_logweights: bool = False,
    shared_length: bool = False,
) -> PreferenceLogps:
    """The per-pair log-probs of `batch` under forward `mode` (with LD-DPO's shared-length sums
    when `shared_length`)."""
    return FORWARD_MODES[mode](model, batch, pad_id, device, with_logweights, shared_length)


# ----------------------------------------------------------------------------------------------
# What a forward mode computes: positions, attention pairs, scored tokens


@dataclass
class Work:
    """What forwards compute, summed over them (`forward_work`)."""

    positions: int = 0  # positions run through the model, padding included
    real_positions: int = 0  # of which not padding
    attention_pairs: int = 0  # (query, key) pairs attended, per layer and query head
    scored: int = 0  # positions through the LM head
    forwards: list[int] = field(default_factory=list)  # positions of each forward

    def __iadd__(self, other: Work) -> Work:
        self.positions += other.positions
        self.real_positions += other.real_positions
        self.attention_pairs += other.attention_pairs
        self.scored += other.scored
        self.forwards += other.forwards
        return self

    @property
    def padding_fraction(self) -> float:
        """Share of the positions run through the model that are padding."""
        return 1.0 - self.real_positions / self.positions if self.positions else 0.0


def forward_work(mode: str, lengths: Sequence[Sequence[int]]) -> Work:
    """The work of one micro-batch of pairs, (prompt, chosen, rejected) token counts each, laid
    out by forward `mode` (its `ForwardMode.forwards`). Padded rows attend over their real length
    only (one causal sequence per prompt + completion), as a shared prompt attends once."""
    triples = [(int(p), int(c), int(r)) for p, c, r in lengths]
    forward = FORWARD_MODES[mode]
    if forward.shares_prompt:
        segments = AttentionSegments.for_shared_prefix(triples)
    else:
        segments = AttentionSegments.for_sequences(
            [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
        )
    forwards = forward.forwards(triples)
    return Work(
        positions=sum(forwards),
        real_positions=segments.length,
        attention_pairs=segments.visible_pairs(),
        scored=sum(c + r for _, c, r in triples),
        forwards=forwards,
    )


def padding_fraction(
    dataset: PreferenceDataset,
    micro_batch_size: int,
    mode: str = "concatenated",
    *,
    global_batch_size: int | None = None,
    group_by_length: bool = False,
    seed: int = 0,
) -> float:
    """Share of the positions forward `mode` runs through the model that are padding, over one
    epoch of the sampler in micro-batches of `micro_batch_size` pairs (`Work.padding_fraction`).

    Micro-batches are contiguous slices of each global batch whatever the world size, so this
    does not depend on the number of ranks. 0 for a padding-free mode.
    """
    m = micro_batch_size
    sampler = GlobalBatchSampler(
        len(dataset),
        global_batch_size or m,
        m,
        0,
        1,
        seed,
        lengths=dataset.sequence_lengths() if group_by_length else None,
        group_by_length=group_by_length,
    )
    lengths = dataset.lengths()[sampler.epoch_order(0).numpy()].reshape(-1, m, 3)
    forward = FORWARD_MODES[mode]
    computed = sum(sum(forward.forwards(micro.tolist())) for micro in lengths)
    return 1.0 - int(forward.real_positions(lengths).sum()) / computed
