"""Attention confined to the sequences of a packed row, through transformers' AttentionInterface.

A packed row [1, T] holds many sequences back to back (padding-free), or, for prefix sharing,
`[prompt | chosen | rejected]` pairs whose rejected tokens see the prompt but not the chosen
completion. `AttentionSegments` says which keys each query sees, as a list of blocks: block i's
queries are the row positions `query_start:query_end`, its keys the concatenation of its key
spans, and query j of the block sees keys 0 .. len(keys) - len(queries) + j (causal, aligned to
the end, as flash-attn's varlen kernel aligns it). The query blocks tile the row in order.
Each block's keys are one sequence's positions in order (a sequence, or a prompt followed by a
completion), so a sliding window (the `sliding_window` transformers passes to attention, per
layer: Mistral's every layer, Gemma 2/3's sliding ones) is the same distance in keys: query j
sees only the last `sliding_window` of its keys, itself included, as transformers' own masks.

`enable_segment_attention(model)` switches a Hugging Face model to the attention implementation
"fsdpo_<base>" (base = the model's configured one: sdpa, eager, flash_attention_2, ...). Without
the `fsdpo_segments` keyword it *is* the base implementation, mask creation included, so padded
forwards are unchanged; with it (the model's forward passes unknown keywords down to attention),
attention runs block by block and the dense mask transformers would build for packed
`position_ids` is skipped. The keyword travels with the decoder blocks' arguments, so activation
checkpointing's recomputation sees it too.

Kernels, chosen by device, never by configuration:
- CUDA, bf16/fp16, flash-attn installed: one `flash_attn_varlen_func` call for the whole row;
- otherwise (CPU, or CUDA without flash-attn): one sdpa call per block, `is_causal=True` when
  queries and keys coincide and no window cuts in, and a small [queries, keys] mask otherwise.
  On a 2-core CPU this was about 6x faster than sdpa with the dense block mask (which also
  computes every cross-sequence score), and it has a backward, which flex_attention lacks on CPU.
  Attention logit softcapping (Gemma 2), which sdpa lacks, runs the model's own eager attention
  per block with the block's mask instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "fsdpo_"
KWARG = "fsdpo_segments"

KeySpan = tuple[int, int]
Block = tuple[int, int, tuple[KeySpan, ...]]


class AttentionSegments:
    """Which keys each query of a packed row sees (see the module docstring).

    A plain class, not a dataclass, so that FSDP's input casting passes it through untouched
    and the masks cached here are shared by every layer (and by recomputation in backward).
    """

    def __init__(self, blocks: Sequence[Block], length: int) -> None:
        self.blocks = [b for b in blocks if b[1] > b[0]]
        self.length = length
        self.calls = 0  # attention calls served: a model that ignores the keyword is caught
        self._masks: dict[tuple[int, int, int | None], Tensor] = {}
        self._varlen: dict[torch.device, tuple[Tensor | None, Tensor, Tensor, int, int]] = {}
        end = 0
        for start, stop, _ in self.blocks:
            if start != end:
                raise ValueError(f"query blocks must tile the row in order; block at {start} after {end}")
            end = stop
        if end != length:
            raise ValueError(f"query blocks cover {end} of {length} positions")
        # keys are cut at every span edge; each block's keys are then a list of whole pieces
        cuts = sorted({0, length} | {edge for _, _, spans in self.blocks for span in spans for edge in span})
        piece_at = {start: i for i, start in enumerate(cuts[:-1])}
        self.query_lengths = [stop - start for start, stop, _ in self.blocks]
        self.key_piece_lengths = [b - a for a, b in itertools.pairwise(cuts)]
        self.block_key_pieces = [
            [i for a, b in spans for i in range(piece_at[a], piece_at[b] if b < length else len(cuts) - 1)]
            for _, _, spans in self.blocks
        ]

    @classmethod
    def for_sequences(cls, lengths: Sequence[int]) -> AttentionSegments:
        """Independent causal sequences back to back (padding-free packing)."""
        blocks, start = [], 0
        for n in lengths:
            blocks.append((start, start + n, ((start, start + n),)))
            start += n
        return cls(blocks, start)

    @classmethod
    def for_shared_prefix(cls, pairs: Sequence[tuple[int, int, int]]) -> AttentionSegments:
        """`[prompt | chosen | rejected]` per (prompt, chosen, rejected) length triple: prompt
        and chosen are one causal sequence; rejected sees the whole prompt and itself causally."""
        blocks, start = [], 0
        for p, c, r in pairs:
            blocks.append((start, start + p + c, ((start, start + p + c),)))
            rejected = start + p + c
            blocks.append((rejected, rejected + r, ((start, start + p), (rejected, rejected + r))))
            start = rejected + r
        return cls(blocks, start)

    def visible_pairs(self) -> int:
        """(query, key) pairs attended over the row: the attention work, for FLOP counts."""
        total = 0
        for start, stop, spans in self.blocks:
            q, k = stop - start, sum(b - a for a, b in spans)
            total += q * (k - q) + q * (q + 1) // 2
        return total

    def causal_mask(
        self, queries: int, keys: int, device: torch.device, window: int | None = None
    ) -> Tensor | None:
        """[queries, keys] bool, query j sees keys up to keys - queries + j, and with a `window`
        only the last `window` of those; None where that is plain causal attention (queries and
        keys coincide and the window, if any, covers them). Cached."""
        if queries == keys and (window is None or window >= keys):
            return None
        mask = self._masks.get((queries, keys, window))
        if mask is None or mask.device != device:
            ones = torch.ones(queries, keys, dtype=torch.bool, device=device)
            mask = ones.tril(keys - queries)
            if window is not None:
                mask &= ~ones.tril(keys - queries - window)
            self._masks[(queries, keys, window)] = mask
        return mask

    def varlen_arguments(self, device: torch.device) -> tuple[Tensor | None, Tensor, Tensor, int, int]:
        """(key gather index or None, cu_seqlens_q, cu_seqlens_k, max_q, max_k) for flash-attn."""
        cached = self._varlen.get(device)
        if cached is None:
            q_lengths = [stop - start for start, stop, _ in self.blocks]
            key_index = [i for _, _, spans in self.blocks for a, b in spans for i in range(a, b)]
            k_lengths = [sum(b - a for a, b in spans) for _, _, spans in self.blocks]
            identity = key_index == list(range(self.length))
            cu_q = torch.tensor([0, *q_lengths], device=device).cumsum(0).to(torch.int32)
            cu_k = torch.tensor([0, *k_lengths], device=device).cumsum(0).to(torch.int32)
            index = None if identity else torch.tensor(key_index, device=device)
            cached = (index, cu_q, cu_k, max(q_lengths), max(k_lengths))
            self._varlen[device] = cached
        return cached


# ----------------------------------------------------------------------------------------------
# The kernels


@torch.compiler.disable  # a Python loop over data-dependent blocks: keep it out of compiled graphs
def segment_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segments: AttentionSegments,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Attention of a packed row: query [1, H, T, D], key/value [1, KV, T, D] -> [1, T, H, D]."""
    if query.shape[0] != 1 or query.shape[2] != segments.length:
        raise ValueError(
            f"segment attention expects one packed row of {segments.length} tokens, got {tuple(query.shape)}"
        )
    segments.calls += 1
    groups = query.shape[1] // key.shape[1]
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
        return _flash_varlen_attention(query, key, value, segments, dropout, scaling, sliding_window, softcap)
    # Split once rather than slice per block: a slice's backward writes into a zero-filled
    # tensor of the whole row, once per block; a split's backward is one concatenation.
    queries = query.split(segments.query_lengths, dim=2)
    key_pieces = key.split(segments.key_piece_lengths, dim=2)
    value_pieces = value.split(segments.key_piece_lengths, dim=2)
    outputs = []
    for q, pieces in zip(queries, segments.block_key_pieces):
        k = key_pieces[pieces[0]] if len(pieces) == 1 else torch.cat([key_pieces[i] for i in pieces], dim=2)
        v = (
            value_pieces[pieces[0]]
            if len(pieces) == 1
            else torch.cat([value_pieces[i] for i in pieces], dim=2)
        )
        mask = segments.causal_mask(q.shape[2], k.shape[2], q.device, sliding_window)
        if softcap:
            outputs.append(_eager_block(module, q, k, v, mask, dropout, scaling, softcap))
            continue
        gqa = groups > 1
        if gqa and q.is_cuda and mask is not None:  # CUDA's fused kernels take GQA only unmasked
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
            gqa = False
        causal = mask is None
        outputs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=gqa
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _eager_block(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    softcap: float,
) -> Tensor:
    """One block through the model's own eager attention (which softcaps the logits) -> [1, H, Q, D]."""
    if mask is None:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
    additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)[None, None]
    out, _ = _base_attention("eager", module)(
        module, query, key, value, additive, dropout=dropout, scaling=scaling, softcap=softcap
    )
    return out.transpose(1, 2)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


@functools.cache
def _flash_varlen() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segments: AttentionSegments,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
) -> Tensor:
    index, cu_q, cu_k, max_q, max_k = segments.varlen_arguments(query.device)
    q = query[0].transpose(0, 1)  # [T, H, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    if index is not None:
        k, v = k.index_select(0, index), v.index_select(0, index)
    extra = {}  # only when used: older flash-attn releases lack the arguments
    if sliding_window is not None:  # as transformers: the last `sliding_window` keys (right side moot)
        extra["window_size"] = (sliding_window - 1, sliding_window - 1)
    if softcap:
        extra["softcap"] = softcap
    out = _flash_varlen()(
        q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True, **extra
    )  # causal (and the window) are aligned to the end of each block's keys (flash-attn >= 2.1)
    return out.unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Registration with transformers

_SEGMENTED_FORWARD = contextvars.ContextVar("fsdpo_segmented_forward", default=False)


@contextlib.contextmanager
def segmented_forward() -> Iterator[None]:
    """Around a model forward that passes `fsdpo_segments`: no dense mask is built for it."""
    token = _SEGMENTED_FORWARD.set(True)
    try:
        yield
    finally:
        _SEGMENTED_FORWARD.reset(token)


def _base_attention(base: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)


def _attention_for(base: str) -> Callable:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        fsdpo_segments: AttentionSegments | None = None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        if fsdpo_segments is None:
            return _base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)
        out = segment_attention(
            module,
            query,
            key,
            value,
            fsdpo_segments,
            dropout=kwargs.get("dropout", 0.0),
            scaling=kwargs.get("scaling"),
            sliding_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
        )
        return out, None

    return attention


def _mask_for(base_mask: Callable) -> Callable:
    def mask(*args, **kwargs):
        if _SEGMENTED_FORWARD.get():
            return None
        return base_mask(*args, **kwargs)

    return mask


def enable_segment_attention(model: nn.Module) -> None:
    """Switch `model` (a transformers model, possibly wrapped by peft) to "fsdpo_<base>"."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    base = config._attn_implementation or "eager"
    if not isinstance(base, str) or base.startswith(PREFIX):
        return
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _attention_for(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS:  # kernels without a mask function get none either
            AttentionMaskInterface.register(name, _mask_for(ALL_MASK_ATTENTION_FUNCTIONS[base]))
    config._attn_implementation = name
