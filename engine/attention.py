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
attention runs as below and the dense mask transformers would build for packed `position_ids`
is skipped. The keyword travels with the decoder blocks' arguments, so activation
checkpointing's recomputation sees it too.

Kernels (`KERNELS`, preferred in that order; `choose_kernel` picks per attention call, from what
`available_kernels` found installed and what the layer needs; `training.attention_kernel` forces
one, layers it cannot serve taking the next that can):

| kernel       | where                                  | serves                                      |
|--------------|----------------------------------------|---------------------------------------------|
| `varlen`     | CUDA, torch's `varlen_attn` (flash)    | fp16/bf16, head dim <= 256 and a multiple of 8, windows if its `window_size` exists; no softcap, no dropout |
| `flash_attn` | CUDA, flash-attn >= 2.1 installed      | fp16/bf16, head dim <= 256, windows (>= 2.3), softcap (>= 2.6), dropout |
| `flex`       | CUDA with Triton, `flex_attention`     | any dtype, windows and softcap (mask_mod / score_mod); no dropout |
| `sdpa_loop`  | everywhere (the only one on CPU)       | everything: one sdpa call per block; softcap through the model's eager attention |

The three varlen kernels see one call per layer for the whole row; keys of prefix-shared blocks
are gathered first (a rejected block's keys are its prompt then itself). GQA heads are shared,
not repeated, where the kernel allows (flex, flash-attn, varlen_attn with `enable_gqa`, sdpa's
unmasked blocks). On a 2-core CPU the sdpa loop was about 6x faster than sdpa with the dense
block mask (which also computes every cross-sequence score), and it has a backward, which
flex_attention lacks on CPU.

torch.compile: varlen_attn is a custom op and flex a higher-order op, so compiled blocks trace
through them (flex builds its block mask inside each compiled block). The sdpa loop is a Python
loop over the row's blocks: under compile, with no dropout and no softcap, it runs as the custom
op `fsdpo::segment_attention` (its backward recomputes the blocks' forward), so blocks still trace
whole; with dropout or softcap, and flash-attn without its own custom ops, attention is a graph
break. Per-row tensors (`PackedTensors`) are built before the decoder runs and their lengths
marked dynamic, so new packed lengths reuse the compiled graphs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.metadata
import inspect
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from engine.errors import UserError
from engine.sequence_parallel import tokens_per_rank

if TYPE_CHECKING:
    from engine.sequence_parallel import SequenceGroup

PREFIX = "fsdpo_"
KWARG = "fsdpo_segments"
KERNELS = ("varlen", "flash_attn", "flex", "sdpa_loop")
KERNEL_KEY = "training.attention_kernel"

KeySpan = tuple[int, int]
Block = tuple[int, int, tuple[KeySpan, ...]]


class AttentionSegments:
    """Which keys each query of a packed row sees (see the module docstring).

    A plain class, not a dataclass, so that FSDP's input casting passes it through untouched
    and the masks and tensors cached here are shared by every layer (and by recomputation in
    backward).
    """

    def __init__(self, blocks: Sequence[Block], length: int) -> None:
        self.blocks = [b for b in blocks if b[1] > b[0]]
        self.length = length
        self.used = False  # set by attention: a model that ignores the keyword is caught
        self.sequence: SequenceGroup | None = None  # `split_over`: this rank holds 1/N of the row
        self.tensors: PackedTensors | None = None
        self._masks: dict[tuple[int, int, int | None], Tensor] = {}
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
        self.key_lengths = [sum(b - a for a, b in spans) for _, _, spans in self.blocks]
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

    def split_over(self, group: SequenceGroup) -> AttentionSegments:
        """The row padded to a multiple of `group.size` positions (the padding one more block,
        which sees only itself), to be held split along positions over `group`: attention then
        exchanges positions for heads (engine/sequence_parallel.py)."""
        padded = tokens_per_rank(self.length, group.size) * group.size
        segments = AttentionSegments([*self.blocks, (self.length, padded, ((self.length, padded),))], padded)
        segments.sequence = group
        return segments

    def layout(self) -> list[int]:
        """The blocks as a flat list (`from_layout` reads it back): per block its query start and
        stop, its count of key spans, then the spans' edges."""
        flat = []
        for start, stop, spans in self.blocks:
            flat += [start, stop, len(spans), *(edge for span in spans for edge in span)]
        return flat

    @staticmethod
    @functools.lru_cache(maxsize=4)  # every layer of one row asks for the same one
    def from_layout(layout: tuple[int, ...]) -> AttentionSegments:
        blocks, i = [], 0
        while i < len(layout):
            start, stop, count = layout[i : i + 3]
            edges = layout[i + 3 : i + 3 + 2 * count]
            blocks.append((start, stop, tuple(zip(edges[::2], edges[1::2]))))
            i += 3 + 2 * count
        return AttentionSegments(blocks, blocks[-1][1] if blocks else 0)

    def visible_pairs(self) -> int:
        """(query, key) pairs attended over the row: the attention work, for FLOP counts."""
        return sum(q * (k - q) + q * (q + 1) // 2 for q, k in zip(self.query_lengths, self.key_lengths))

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

    def prepare(self, device: torch.device, kernel: str = "auto") -> PackedTensors:
        """The row's `PackedTensors` on `device` (built once; call it before a compiled forward,
        so that the graphs see tensors, not Python lists), with `kernel` forced ("auto": none)."""
        if self.tensors is not None and self.tensors.device == device and self.tensors.kernel == kernel:
            return self.tensors
        if kernel != "auto" and kernel not in KERNELS:
            raise UserError(f"{KERNEL_KEY}: {kernel!r} is not one of auto, {', '.join(KERNELS)}")
        n = len(self.blocks)
        key_index = [i for _, _, spans in self.blocks for a, b in spans for i in range(a, b)]
        q_len, k_len = torch.tensor(self.query_lengths), torch.tensor(self.key_lengths)
        cu_q = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)])
        cu_k = torch.cat([torch.zeros(1, dtype=torch.long), k_len.cumsum(0)])
        blocks = torch.arange(n)
        q_block, k_block = blocks.repeat_interleave(q_len), blocks.repeat_interleave(k_len)
        k_pos = torch.arange(len(key_index)) - cu_k[:-1].repeat_interleave(k_len)
        q_pos = torch.arange(self.length) - cu_q[:-1].repeat_interleave(q_len) + (k_len - q_len)[q_block]

        def put(t: Tensor, dtype: torch.dtype = torch.int32, on: torch.device = device) -> Tensor:
            t = t.to(device=on, dtype=dtype)
            torch._dynamo.maybe_mark_dynamic(t, 0)  # a new packed length is no new graph
            return t

        self.tensors = PackedTensors(
            device=device,
            available=available_kernels(device.type),
            kernel=kernel,
            cu_q=put(cu_q),
            cu_k=put(cu_k),
            key_index=None
            if key_index == list(range(self.length))
            else put(torch.tensor(key_index), torch.long),
            max_q=max(self.query_lengths, default=0),
            max_k=max(self.key_lengths, default=0),
            q_block=put(q_block),
            q_pos=put(q_pos),
            k_block=put(k_block),
            k_pos=put(k_pos),
            layout=put(torch.tensor(self.layout()), torch.long, torch.device("cpu")),
        )
        return self.tensors


@dataclasses.dataclass
class PackedTensors:
    """What the kernels read for one row on one device, built outside any compiled graph.

    `cu_q`/`cu_k` are the blocks' cumulative query and key counts (int32), `key_index` the row
    positions of the blocks' keys in order (None when that is the row itself: plain packing),
    `q_block`/`q_pos`/`k_block`/`k_pos` each query's and gathered key's block and position in its
    block's keys (flex's mask), `layout` the blocks on the CPU (the sdpa loop's custom op)."""

    device: torch.device
    available: frozenset[str]
    kernel: str  # forced by the recipe, or "auto"
    cu_q: Tensor
    cu_k: Tensor
    key_index: Tensor | None
    max_q: int
    max_k: int
    q_block: Tensor
    q_pos: Tensor
    k_block: Tensor
    k_pos: Tensor
    layout: Tensor
    block_masks: dict[int | None, BlockMask] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Choosing a kernel


@dataclasses.dataclass(frozen=True)
class LayerNeeds:
    """What one attention call asks of a kernel."""

    half: bool  # fp16/bf16 inputs (the flash kernels take no fp32)
    head_dim: int
    window: bool = False
    softcap: bool = False
    dropout: bool = False


def serves(kernel: str, available: frozenset[str], needs: LayerNeeds) -> bool:
    """Whether `kernel` (installed with the features in `available`) computes a layer with `needs`."""
    if kernel == "varlen":
        return (
            needs.half
            and needs.head_dim <= 256
            and needs.head_dim % 8 == 0
            and not (needs.softcap or needs.dropout)
            and (not needs.window or "varlen:window" in available)
        )
    if kernel == "flash_attn":
        return (
            needs.half
            and needs.head_dim <= 256
            and (not needs.window or "flash_attn:window" in available)
            and (not needs.softcap or "flash_attn:softcap" in available)
        )
    if kernel == "flex":
        return not needs.dropout
    return kernel == "sdpa_loop"


def choose_kernel(available: frozenset[str], needs: LayerNeeds, forced: str = "auto") -> str:
    """The first of `KERNELS` (from `forced` on, unless "auto") that is in `available` and serves
    `needs`. A forced kernel that is not available, and flash-attn older than 2.1 (its causal
    mask is aligned to the start, which prefix sharing's rejected blocks cannot use), are user
    errors."""
    if forced != "auto" and forced not in available:
        raise UserError(
            f'{KERNEL_KEY} = "{forced}": not available here (available: {", ".join(k for k in KERNELS if k in available)}); '
            'use "auto"'
        )
    for kernel in KERNELS[0 if forced == "auto" else KERNELS.index(forced) :]:
        if kernel in available and serves(kernel, available, needs):
            if kernel == "flash_attn" and "flash_attn:before_2.1" in available:
                raise UserError(
                    f"{KERNEL_KEY}: the installed flash-attn is older than 2.1 (its causal mask is aligned "
                    'top-left, which breaks prefix_shared); upgrade or uninstall it, or set it to "flex" or "sdpa_loop"'
                )
            return kernel
    raise AssertionError("sdpa_loop serves every layer")


@functools.cache
def available_kernels(device_type: str) -> frozenset[str]:
    """The kernels (and their optional features, "kernel:feature") installed for `device_type`."""
    found = {"sdpa_loop"}
    if device_type != "cuda":
        return frozenset(found)  # flex_attention has no backward on CPU
    varlen = _varlen_attn()
    flash_ok = torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability() >= (
        8,
        0,
    )
    if varlen is not None and flash_ok:  # torch's flash kernels: Ampere and later
        params = inspect.signature(varlen).parameters
        features = (("window", "window_size"), ("gqa", "enable_gqa"))
        found |= {"varlen"} | {f"varlen:{f}" for f, p in features if p in params}
        _LOADED["varlen"] = varlen
    flash = _flash_varlen()
    if flash is not None:
        _LOADED["flash_attn"] = flash
        version = tuple(int(x) for x in importlib.metadata.version("flash_attn").split(".")[:2])
        found.add("flash_attn")
        for feature, since in (("before_2.1", None), ("window", (2, 3)), ("softcap", (2, 6))):
            if (since is None and version < (2, 1)) or (since is not None and version >= since):
                found.add(f"flash_attn:{feature}")
        if hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward"):
            found.add("flash_attn:custom_op")  # flash-attn >= 2.6 registers its kernels with torch
    from torch.utils._triton import has_triton

    if has_triton():
        found.add("flex")
        # uncompiled, flex computes the dense scores; inside a compiled block it is traced anyway
        _LOADED["flex"] = torch.compile(flex_attention)
    return frozenset(found)


_LOADED: dict[str, Callable] = {}  # the kernels available_kernels found, read by traced code


def kernel_plan(config, device: torch.device, dtype: torch.dtype, forced: str = "auto") -> dict[str, str]:
    """{layer kind: kernel} the packed modes will use for a transformers `config`'s layers (as
    `choose_kernel` picks per call), for the start-up line and the run's records."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    available = available_kernels(device.type)
    plan = {}
    for kind in sorted(kinds):
        needs = LayerNeeds(
            half=dtype in (torch.float16, torch.bfloat16),
            head_dim=head_dim,
            window=bool(window) and "sliding" in kind,
            softcap=bool(getattr(config, "attn_logit_softcapping", None)),
            dropout=bool(getattr(config, "attention_dropout", 0.0)),
        )
        plan[kind] = choose_kernel(available, needs, forced)
    return plan


# ----------------------------------------------------------------------------------------------
# The kernels


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
    segments.used = True
    tensors = segments.tensors
    if tensors is None or tensors.device != query.device:
        tensors = segments.prepare(query.device)
    needs = LayerNeeds(
        half=query.dtype in (torch.float16, torch.bfloat16),
        head_dim=query.shape[-1],
        window=sliding_window is not None,
        softcap=bool(softcap),
        dropout=dropout > 0,
    )
    kernel = choose_kernel(tensors.available, needs, tensors.kernel)
    if kernel == "varlen":
        return _varlen_attention(query, key, value, tensors, scaling, sliding_window)
    if kernel == "flash_attn":
        flash = _flash_attention if "flash_attn:custom_op" in tensors.available else _flash_attention_eager
        return flash(query, key, value, tensors, dropout, scaling, sliding_window, softcap)
    if kernel == "flex":
        return _flex_attention(query, key, value, tensors, scaling, sliding_window, softcap)
    if torch.compiler.is_compiling() and not needs.dropout and not needs.softcap:
        return torch.ops.fsdpo.segment_attention(query, key, value, tensors.layout, scaling, sliding_window)
    return _sdpa_loop_eager(module, query, key, value, segments, dropout, scaling, sliding_window, softcap)


def _sdpa_loop(
    module: nn.Module | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segments: AttentionSegments,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
) -> Tensor:
    """One sdpa call per block (the model's eager attention when softcapped) -> [1, T, H, D]."""
    groups = query.shape[1] // key.shape[1]
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


# a Python loop over data-dependent blocks: a graph break under compile (see the custom op below)
_sdpa_loop_eager = torch.compiler.disable(_sdpa_loop)


@torch.library.custom_op("fsdpo::segment_attention", mutates_args=())
def _sdpa_loop_op(
    query: Tensor, key: Tensor, value: Tensor, layout: Tensor, scale: float | None, window: int | None
) -> Tensor:
    """The sdpa loop as one opaque op for compiled graphs (no dropout, no softcap)."""
    segments = AttentionSegments.from_layout(tuple(layout.tolist()))
    return _sdpa_loop(None, query, key, value, segments, 0.0, scale, window, None)


@_sdpa_loop_op.register_fake
def _(
    query: Tensor, key: Tensor, value: Tensor, layout: Tensor, scale: float | None, window: int | None
) -> Tensor:
    b, h, t, d = query.shape
    return query.new_empty(b, t, h, d)


@torch.library.custom_op("fsdpo::segment_attention_backward", mutates_args=())
def _sdpa_loop_backward_op(
    grad: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Tensor,
    scale: float | None,
    window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `_sdpa_loop_op`, recomputing its forward (sdpa's public API keeps no
    log-sum-exp to differentiate from)."""
    segments = AttentionSegments.from_layout(tuple(layout.tolist()))

    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _sdpa_loop(None, q, k, v, segments, 0.0, scale, window, None)

    # torch.func, not torch.autograd: a custom op's body runs with autograd's dispatch keys off
    _, vjp = torch.func.vjp(forward, query, key, value)
    return tuple(g.contiguous() for g in vjp(grad))


@_sdpa_loop_backward_op.register_fake
def _(
    grad: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Tensor,
    scale: float | None,
    window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)  # contiguous


def _sdpa_loop_setup(ctx, inputs: tuple, output: Tensor) -> None:
    query, key, value, layout, scale, window = inputs
    ctx.save_for_backward(query, key, value, layout)
    ctx.scale, ctx.window = scale, window


def _sdpa_loop_grad(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    query, key, value, layout = ctx.saved_tensors
    dq, dk, dv = torch.ops.fsdpo.segment_attention_backward(
        grad.contiguous(), query, key, value, layout, ctx.scale, ctx.window
    )
    return dq, dk, dv, None, None, None


_sdpa_loop_op.register_autograd(_sdpa_loop_grad, setup_context=_sdpa_loop_setup)


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


def _gathered(
    query: Tensor, key: Tensor, value: Tensor, tensors: PackedTensors
) -> tuple[Tensor, Tensor, Tensor]:
    """[T, H, D] queries and the blocks' keys and values in order, [T_k, KV, D]."""
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    if tensors.key_index is not None:
        k, v = k.index_select(0, tensors.key_index), v.index_select(0, tensors.key_index)
    return q, k, v


@functools.cache
def _varlen_attn() -> Callable | None:
    """torch's varlen_attn, from the release that takes `scale` (earlier ones lack it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "scale" in inspect.signature(varlen_attn).parameters else None


def _varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tensors: PackedTensors,
    scaling: float | None,
    sliding_window: int | None,
) -> Tensor:
    """torch's varlen_attn (a custom op, so compiled blocks trace through it)."""
    q, k, v = _gathered(query, key, value, tensors)
    extra: dict = {}
    if "varlen:window" in tensors.available:  # (-1, 0) is causal; (W - 1, 0) the last W keys
        extra["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    else:  # the first releases: causal only (windowed layers are not sent here)
        extra["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "varlen:gqa" in tensors.available:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = _LOADED["varlen"](
        q, k, v, tensors.cu_q, tensors.cu_k, tensors.max_q, tensors.max_k, scale=scaling, **extra
    )
    return out.unsqueeze(0)


@functools.cache
def _flash_varlen() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tensors: PackedTensors,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
) -> Tensor:
    """flash-attn's varlen kernel (GQA native); causal and the window are aligned to the end of
    each block's keys (flash-attn >= 2.1)."""
    q, k, v = _gathered(query, key, value, tensors)
    extra = {}  # only when used: older flash-attn releases lack the arguments
    if sliding_window is not None:  # as transformers: the last `sliding_window` keys (right side moot)
        extra["window_size"] = (sliding_window - 1, sliding_window - 1)
    if softcap:
        extra["softcap"] = softcap
    out = _LOADED["flash_attn"](
        q, k, v, tensors.cu_q, tensors.cu_k, tensors.max_q, tensors.max_k,
        dropout_p=dropout, softmax_scale=scaling, causal=True, **extra,
    )  # fmt: skip
    return out.unsqueeze(0)


_flash_attention_eager = torch.compiler.disable(_flash_attention)  # flash-attn without custom ops


def _block_mask(tensors: PackedTensors, window: int | None) -> BlockMask:
    """flex_attention's BlockMask of the row: same block, causal in the block's keys, windowed."""
    q_block, q_pos, k_block, k_pos = tensors.q_block, tensors.q_pos, tensors.k_block, tensors.k_pos

    def visible(b, h, q, kv):
        seen = (q_block[q] == k_block[kv]) & (k_pos[kv] <= q_pos[q])
        return seen if window is None else seen & (q_pos[q] - k_pos[kv] < window)

    return create_block_mask(visible, None, None, q_block.shape[0], k_block.shape[0], device=tensors.device)


def _flex_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    tensors: PackedTensors,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
) -> Tensor:
    """flex_attention with the row's block mask (built once per row and window, or in the
    compiled graph) and softcapping as its score_mod."""
    if torch.compiler.is_compiling():
        block_mask, flex = _block_mask(tensors, sliding_window), flex_attention
    else:
        block_mask = tensors.block_masks.get(sliding_window)
        if block_mask is None:
            block_mask = tensors.block_masks[sliding_window] = _block_mask(tensors, sliding_window)
        flex = _LOADED.get("flex", flex_attention)  # compiled on CUDA; forward-only eager on CPU
    score_mod = None
    if softcap:

        def score_mod(score, b, h, q, kv):
            return torch.tanh(score / softcap) * softcap

    k, v = key, value
    if tensors.key_index is not None:
        k, v = key.index_select(2, tensors.key_index), value.index_select(2, tensors.key_index)
    gqa = k.shape[1] != query.shape[1]
    out = flex(query, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


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
        group = fsdpo_segments.sequence
        if group is not None:  # this rank's positions, all heads -> the whole row, its heads
            query, key, value = group.to_heads(query), group.to_heads(key), group.to_heads(value)
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
        return (out if group is None else group.to_positions(out)), None

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
