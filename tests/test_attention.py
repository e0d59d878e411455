"""Packed attention kernels: the selection table, flex's block mask (forward on CPU), the sdpa loop's
custom op (schema, fake kernel, autograd) and compiled blocks that trace whole; the CUDA kernels
(varlen_attn, flash-attn, flex) against a dense fp32 reference where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import (
    KERNELS,
    AttentionSegments,
    LayerNeeds,
    _flex_attention,
    _sdpa_loop_eager,
    available_kernels,
    choose_kernel,
    kernel_plan,
    segment_attention,
)
from engine.data import PairBatch
from engine.errors import UserError

CPU = torch.device("cpu")
BF16 = LayerNeeds(half=True, head_dim=128)
ALL = frozenset(
    {
        "varlen",
        "varlen:window",
        "varlen:gqa",
        "flash_attn",
        "flash_attn:window",
        "flash_attn:softcap",
        "flex",
        "sdpa_loop",
    }
)
OLD_TORCH = frozenset(
    {"varlen", "flash_attn", "flash_attn:window", "flex", "sdpa_loop"}
)  # varlen without windows


@pytest.mark.parametrize(
    ("available", "needs", "forced", "expected"),
    [
        # a GPU with everything installed
        (ALL, BF16, "auto", "varlen"),
        (ALL, LayerNeeds(half=True, head_dim=128, window=True), "auto", "varlen"),
        (ALL, LayerNeeds(half=True, head_dim=256, softcap=True, window=True), "auto", "flash_attn"),
        (ALL, LayerNeeds(half=True, head_dim=128, dropout=True), "auto", "flash_attn"),
        (ALL, LayerNeeds(half=True, head_dim=80 + 4), "auto", "flash_attn"),  # not a multiple of 8
        (ALL, LayerNeeds(half=True, head_dim=512), "auto", "flex"),
        (ALL, LayerNeeds(half=False, head_dim=128), "auto", "flex"),  # fp32: no flash kernel
        (ALL, LayerNeeds(half=False, head_dim=128, dropout=True), "auto", "sdpa_loop"),
        # varlen_attn without window_size; no flash-attn
        (OLD_TORCH, LayerNeeds(half=True, head_dim=128, window=True), "auto", "flash_attn"),
        (
            frozenset({"varlen", "flex", "sdpa_loop"}),
            LayerNeeds(half=True, head_dim=128, window=True),
            "auto",
            "flex",
        ),
        (
            frozenset({"varlen", "flex", "sdpa_loop"}),
            LayerNeeds(half=True, head_dim=64, softcap=True),
            "auto",
            "flex",
        ),
        (
            frozenset({"varlen", "sdpa_loop"}),
            LayerNeeds(half=True, head_dim=64, softcap=True),
            "auto",
            "sdpa_loop",
        ),
        # forced: served where it can, the rest by the kernels after it
        (ALL, BF16, "flex", "flex"),
        (ALL, BF16, "sdpa_loop", "sdpa_loop"),
        (ALL, LayerNeeds(half=True, head_dim=128, softcap=True), "varlen", "flash_attn"),
        (ALL, LayerNeeds(half=True, head_dim=128, dropout=True), "flex", "sdpa_loop"),
        # CPU
        (available_kernels("cpu"), BF16, "auto", "sdpa_loop"),
        (
            available_kernels("cpu"),
            LayerNeeds(half=False, head_dim=64, window=True, softcap=True),
            "auto",
            "sdpa_loop",
        ),
    ],
)
def test_kernel_table(available: frozenset, needs: LayerNeeds, forced: str, expected: str) -> None:
    assert choose_kernel(available, needs, forced) == expected


def test_cpu_has_only_the_sdpa_loop_and_a_missing_forced_kernel_names_the_key() -> None:
    assert available_kernels("cpu") == frozenset({"sdpa_loop"})
    for kernel in KERNELS[:-1]:
        with pytest.raises(UserError, match=rf'^training\.attention_kernel = "{kernel}": not available'):
            choose_kernel(available_kernels("cpu"), BF16, kernel)


def test_flash_attn_before_2_1_is_refused_only_where_it_would_run() -> None:
    old = frozenset({"varlen", "flash_attn", "flash_attn:before_2.1", "sdpa_loop"})
    assert choose_kernel(old, BF16) == "varlen"
    with pytest.raises(UserError, match=r"older than 2\.1.*top-left"):
        choose_kernel(old, LayerNeeds(half=True, head_dim=128, dropout=True))


def test_kernel_plan_reads_the_layer_kinds_of_a_config() -> None:
    from transformers import AutoConfig

    gemma = AutoConfig.for_model(
        "gemma2", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8
    )
    assert kernel_plan(gemma, CPU, torch.float32) == {
        "full_attention": "sdpa_loop",
        "sliding_attention": "sdpa_loop",
    }
    mistral = AutoConfig.for_model("mistral", sliding_window=8)
    assert kernel_plan(mistral, CPU, torch.bfloat16) == {"sliding_attention": "sdpa_loop"}
    with pytest.raises(UserError, match="attention_kernel"):
        kernel_plan(mistral, CPU, torch.bfloat16, "varlen")


# ----------------------------------------------------------------------------------------------
# Numerics against a dense reference

LAYOUTS = {
    "packed": AttentionSegments.for_sequences([5, 1, 9, 3]),
    "prefix_shared": AttentionSegments.for_shared_prefix([(6, 5, 4), (2, 9, 7), (1, 1, 3)]),
}


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: AttentionSegments,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """float64 attention with the mask of each query's block written out key by key -> [1, T, H, D]."""
    n = segments.length
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for start, stop, spans in segments.blocks:
        keys = [i for a, b in spans for i in range(a, b)]
        for j, query in enumerate(range(start, stop)):
            at = len(keys) - (stop - start) + j
            for i, key in enumerate(keys):
                allowed[query, key] = i <= at and (window is None or at - i < window)
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _qkv(n: int, dtype=torch.float32, device=CPU, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, n, dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (None, 2.0), (4, 1.5)])
def test_flex_block_mask_equals_the_dense_mask(
    layout: str, window: int | None, softcap: float | None
) -> None:
    """flex_attention's forward (eager on CPU) with the row's block mask, GQA and a scale."""
    segments = LAYOUTS[layout]
    q, k, v = _qkv(segments.length)
    got = _flex_attention(q, k, v, segments.prepare(CPU), 0.3, window, softcap)
    expected = dense_reference(q, k, v, segments, window, softcap, 0.3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)  # fp32 rounding


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_sdpa_loop_custom_op(layout: str) -> None:
    """`fsdpo::segment_attention` passes torch.library.opcheck (schema, fake kernel, autograd
    registration, AOT dispatch with dynamic shapes), and its values and gradients (backward by
    recomputation) equal the plain loop's and the dense reference's."""
    segments = LAYOUTS[layout]
    layout_tensor = segments.prepare(CPU).layout
    q, k, v = (t.requires_grad_() for t in _qkv(segments.length))
    torch.library.opcheck(torch.ops.fsdpo.segment_attention, (q, k, v, layout_tensor, 0.3, 4))
    results = []
    for attention in (
        lambda q, k, v: torch.ops.fsdpo.segment_attention(q, k, v, layout_tensor, 0.3, 4),
        lambda q, k, v: _sdpa_loop_eager(None, q, k, v, segments, 0.0, 0.3, 4, None),
    ):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    expected = dense_reference(q, k, v, segments, 4, None, 0.3)
    torch.testing.assert_close(results[0][0].double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# torch.compile


def _pairs(count: int, seed: int) -> PairBatch:
    g = torch.Generator().manual_seed(seed)

    def tokens() -> list[int]:
        return torch.randint(3, 290, (int(torch.randint(1, 16, (1,), generator=g)),), generator=g).tolist()

    return PairBatch(
        torch.arange(count),
        torch.ones(count, dtype=torch.bool),
        *([tokens() for _ in range(count)] for _ in range(3)),
    )


@pytest.mark.slow
def test_compiled_blocks_trace_whole_over_packed_lengths() -> None:
    """Compiled blocks (parallel.apply_compile) over four packed batches of different lengths in
    both packed modes, forward and backward: no graph break (the sdpa loop is a custom op under
    compile), one graph, no recompilation (lengths are dynamic from the start), and the eager
    model's log-probs and gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.forward import SequenceLogprobs, policy_logps
    from engine.parallel import apply_compile, compile_stats, reset_compile_stats

    config = AutoConfig.for_model(
        "llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    eager = SequenceLogprobs(AutoModelForCausalLM.from_config(config))
    compiled = SequenceLogprobs(AutoModelForCausalLM.from_config(config))
    compiled.load_state_dict(eager.state_dict())
    reset_compile_stats()  # earlier compiles in this process (other tests) do not count
    apply_compile(compiled)
    for i, mode in enumerate(["packed", "packed", "prefix_shared", "prefix_shared"]):
        batch = _pairs(2 + i % 2, seed=i)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            out = policy_logps(mode, model, batch, 0, CPU)
            (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
            results.append(
                [out.chosen_logps.detach(), out.rejected_logps.detach()]
                + [p.grad for p in model.parameters()]
            )
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    stats = compile_stats()
    assert (stats["graph_breaks"], stats["graphs"], stats["recompiles"]) == (0, 1, 0), stats
    assert stats["compile_s"] > 0


# ----------------------------------------------------------------------------------------------
# CUDA kernels (run only where a GPU is)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (None, 2.0)])
def test_cuda_kernels_match_a_dense_fp32_reference(kernel: str, layout: str, window, softcap) -> None:
    """bf16 values and gradients of each installed kernel that serves the layer (else the one
    `choose_kernel` falls back to, still checked) against float64 dense attention."""
    cuda = torch.device("cuda")
    available = available_kernels("cuda")
    if kernel not in available:
        pytest.skip(f"{kernel} is not installed")
    segments = LAYOUTS[layout]
    segments.prepare(cuda, kernel)
    q, k, v = (t.requires_grad_() for t in _qkv(segments.length, torch.bfloat16, cuda, 8, 2, 64))
    out = segment_attention(torch.nn.Module(), q, k, v, segments, 0.0, 0.2, window, softcap)
    weights = torch.linspace(-1, 1, out.numel(), device=cuda).view(out.shape)
    (out.float() * weights).sum().backward()
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*ref_inputs, segments, window, softcap, 0.2)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for got, expected in zip((q.grad, k.grad, v.grad), (t.grad for t in ref_inputs)):
        torch.testing.assert_close(got.double(), expected, rtol=5e-2, atol=5e-2)
