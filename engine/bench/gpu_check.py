"""The GPU check: one command that measures what a code read can only predict, on one GPU.

    python -m engine.bench --gpu-check OUT_DIR [--gpu-check-size auto|tiny|full]
                           [--gpu-check-phases environment,numerics,...]

Everything is built from configs (random init from recipes/assets/tiny-llama's config with
overrides) and synthetic pairs (`engine.bench.common.synthetic_pairs`): no download, no data file, no
`datasets`. Phases run in priority order, each in its own try/except; each writes
OUT_DIR/<phase>.json as soon as it ends (a long phase also rewrites it after every item), so a
timeout keeps what was done. A failing phase records its error and traceback and the next one
runs. At the end OUT_DIR/summary.json (every phase's status, time and headline numbers) and
OUT_DIR/summary.md (the throughput table, README-ready).

Phases (`PHASES`), what each measures:
1. environment: versions (python, torch, CUDA, cuDNN, transformers, peft, flash-attn, triton,
   pyarrow, datasets), the device, TF32 and allocator settings; the bf16 matmul rate at 2048^3
   and 8192^3 (`engine.metrics.measure_matmul_flops`) against the device table's dense peak
   (`engine.metrics.device_peak`); which packed-attention kernels the engine finds
   (`engine.attention.available_kernels`, `kernel_plan`) and, independently, what is importable
   (torch's varlen_attn and its parameters, flex_attention, flash-attn); which sdpa backends run
   causal GQA and masked attention.
2. numerics: a small Llama (h512, 4 layers, 8/2 heads, vocab 32k) whose LM head is scaled to a
   logit std of 6 (trained models' range, where bf16 logit rounding matters), built by the
   trainer's `engine.step.build_model`: the four forward modes' sequence log-probs in fp32
   against concatenated's (max relative difference, must be <= 1e-5); per-token log-probs in
   bf16 against fp32 in each mode (mean / p99 / max of |delta|, mean signed delta) and the
   sequence sums' deltas; step 0 of DPO in fp32 and bf16 with the reference scored as the trainer
   scores it (`engine.reference.reference_layout`, 4 x micro-batch pairs per forward, eval mode)
   and the policy in its own micro-batches: loss, ln 2 - loss, accuracy, max |log-ratio|.
3. attention: the attention op alone, for each kernel the engine has here, on Llama-3 head shapes
   (32 query heads, 8 KV heads, head dim 128) over a packed row of 12 sequences (8192 tokens)
   and a row of prefix-shared triples (each rejected block has fewer queries than keys: the
   causal mask is aligned bottom-right): max error of the output and of dq/dk/dv against dense
   fp32 attention with a mask built here from the lengths (not by engine.attention), relative to
   the reference's largest value; forward and forward+backward time (CUDA events on CUDA,
   perf_counter on CPU) and the attention TFLOP/s (12 x heads x head dim x pairs attended, the
   count engine.metrics uses).
4. throughput: a random-init Llama-3-8B-width model with 8 layers (2.80B parameters: 1.75B in
   the blocks, 1.05B in embedding and head), pairs of 2048 tokens at most (prompt ~300, completions
   100-800), 16 pairs per step, in `RUNS` order (mode @ token budget, activation checkpointing):
   timed steps of the trainer's own step through `engine.bench.modes.run_mode`, tokens/s, MFU against
   the table's dense peak (`engine.bench.modes.summarize`, engine.metrics' one FLOP count), peak
   allocated and reserved memory against the dry run's estimate (`engine.plan.estimate_memory`).
5. syncs: host-device synchronisations per step, as the difference between a run of 1 and of 2
   timed steps (the model build and the warm-up step fall out): on CUDA the warnings of
   `torch.cuda.set_sync_debug_mode("warn")`, by file:line; on CPU, where nothing waits, the
   reads of tensor values into Python counted by `engine.syncs.ReadCounter` (reads of
   host tensors included, the bench's own accounting of a step among them), by kind and
   file:function, or "n/a on CPU" in a checkout without tests/.
6. compile: `parallel.compile` off, then on, for one packed mode without recompute: step time,
   the time build + warm-up took (compilation included), dynamo's compile time, graphs, graph
   breaks (with their reasons) and recompiles (`engine.parallel.compile_stats`).

Budget of the full size on one H200 (~800 TFLOP/s measured bf16 matmul, 989 dense peak), to end
in under 8 minutes with the process start (~15 s: imports, CUDA context) included. A phase's cap
(`budget_s`) is checked between its items (kernels, runs): items left when it is spent are
written as skipped; an item that has started is not interrupted, and a phase that would start
after the sum of all caps is skipped.
- environment, cap 20 s: CUDA and cuBLAS start ~5 s; each matmul size is timed for >= 0.3 s
  (2048^3 = 17 GFLOP, 8192^3 = 1.1 TFLOP: 1.4 ms at 800 TFLOP/s); sdpa probes < 1 s. ~8 s.
- numerics, cap 50 s: a 50M-parameter model, 16 pairs (~500 tokens each): ~30 forwards of
  < 50 ms; the first fp32 packed forward compiles flex_attention (fp32 has no flash kernel),
  ~15 s, and bf16 packed may compile it again if varlen is missing. ~25 s.
- attention, cap 50 s: per kernel and row ~0.1 GFLOP x 5 repeats (< 1 ms each) plus the dense
  fp32 reference (8192^2 x 32 heads: ~1.1 TFLOP forward, 3x with backward, < 0.2 s); flex
  compiles forward and backward once per row shape (~10 s each). ~25 s.
- throughput, cap 150 s: a step is 16 pairs x ~1500 pair tokens = 24k tokens; model FLOPs
  ~6 x 1.75B x 24k + 6 x 0.53B x 12k scored = 3.1e14, at ~40% of 989 TFLOP/s ~0.8 s, ~1.1 s
  with full recompute (+1/3), ~1.3 s for concatenated's padding. A run: building the model on
  the host and sharding it (~10 s for 11 GB of fp32 weights), 1 warm-up + 3 timed steps
  (~5 s): ~15 s, so the 8 runs of `RUNS` need ~120 s; the cap drops the last ones if slower.
- syncs, cap 30 s: 8 layers at h1024 (the count does not depend on width), packed@8192, two
  runs of ~3 s. ~8 s.
- compile, cap 110 s: two runs of the throughput model (~15 s each) and Inductor compiling the
  block's forward and backward with dynamic shapes (~40-60 s). ~90 s.
Caps: 20 + 50 + 50 + 150 + 30 + 110 = 410 s = 6.8 min (+ start-up: ~7.1 min); expected
8 + 25 + 25 + 120 + 8 + 90 = 276 s, ~4.9 min with the start-up.

The tiny size (automatic on CPU) runs the same code on the demo's tiny Llama (h64, 2 layers),
rows of 256 tokens and 1 timed step per run, so the whole check is a CI test
(tests/test_gpu_check.py). On CPU the compile phase runs only when --gpu-check-phases names it
(Inductor's C++ build of even the tiny model takes tens of seconds there).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine import attention
from engine.bench import common, modes
from engine.config import Config
from engine.distributed import World, init_distributed, log
from engine.errors import UserError, first_line
from engine.metrics import Peak, device_peak, format_rate, matmul_peak, measure_matmul_flops, table_peak
from engine.parallel import compute_dtype
from engine.recipe import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.toml"  # the tiny Llama's config and tokenizer; its data is never read
PHASES = ("environment", "numerics", "attention", "throughput", "syncs", "compile")
LN2 = math.log(2)
GIB = 2**30
FP32_MODES_REL_TOL = 1e-5

LLAMA3_8B_WIDTH_8_LAYERS = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class PairSpec:
    """Synthetic pairs (`engine.bench.common.synthetic_pairs`)."""

    count: int
    prompt_len: int
    completion_len: tuple[int, int]
    max_length: int

    def make(self, vocab: int, seed: int) -> list[common.Pair]:
        return common.synthetic_pairs(
            self.count, self.prompt_len, self.completion_len, vocab, self.max_length, seed
        )


@dataclass(frozen=True)
class CheckSize:
    """The shapes of one size of the check (`SIZES`)."""

    name: str
    budgets_s: dict[str, float]
    matmul_sizes: tuple[int, ...]
    numerics_model: dict[str, Any]  # config overrides of the recipe's model
    numerics_pairs: PairSpec
    numerics_micro: int
    attention_heads: tuple[int, int, int]  # query heads, KV heads, head dim
    attention_tokens: int
    attention_sequences: int  # in the packed row
    attention_triples: int  # in the prefix-shared row
    attention_repeats: int
    throughput_model: dict[str, Any]
    throughput_pairs: PairSpec
    throughput_batch: tuple[int, int]  # global batch, micro-batch (pairs)
    runs: tuple[tuple[str, str], ...]  # (bench mode, parallel.activation_checkpointing), by priority
    warmup: int
    steps: int
    syncs_model: dict[str, Any]
    packed_mode: str  # of the syncs and compile phases
    compile_warmup: int


def _runs(budget: int) -> tuple[tuple[str, str], ...]:
    packed, shared = f"packed@{budget}", f"prefix_shared@{budget}"
    return (
        (packed, "full"),
        ("concatenated", "full"),
        (shared, "full"),
        ("separate", "full"),
        (packed, "none"),
        (packed, "selective"),
        (shared, "selective"),
        ("concatenated", "selective"),
    )


SIZES = {
    "full": CheckSize(
        name="full",
        budgets_s={
            "environment": 20,
            "numerics": 50,
            "attention": 50,
            "throughput": 150,
            "syncs": 30,
            "compile": 110,
        },
        matmul_sizes=(2048, 8192),
        numerics_model={
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "num_hidden_layers": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 1024,
        },
        numerics_pairs=PairSpec(16, 128, (32, 256), 512),
        numerics_micro=4,
        attention_heads=(32, 8, 128),
        attention_tokens=8192,
        attention_sequences=12,
        attention_triples=6,
        attention_repeats=5,
        throughput_model=LLAMA3_8B_WIDTH_8_LAYERS,
        throughput_pairs=PairSpec(64, 300, (100, 800), 2048),
        throughput_batch=(16, 2),
        runs=_runs(8192),
        warmup=1,
        steps=3,
        syncs_model={
            **LLAMA3_8B_WIDTH_8_LAYERS,
            "hidden_size": 1024,
            "intermediate_size": 3584,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "vocab_size": 32000,
        },
        packed_mode="packed@8192",
        compile_warmup=2,
    ),
    "tiny": CheckSize(
        name="tiny",
        budgets_s={
            "environment": 20,
            "numerics": 30,
            "attention": 20,
            "throughput": 60,
            "syncs": 20,
            "compile": 300,
        },
        matmul_sizes=(128, 256),
        numerics_model={"num_hidden_layers": 2},
        numerics_pairs=PairSpec(8, 12, (4, 24), 64),
        numerics_micro=2,
        attention_heads=(4, 2, 16),
        attention_tokens=256,
        attention_sequences=12,
        attention_triples=4,
        attention_repeats=2,
        throughput_model={"num_hidden_layers": 2},
        throughput_pairs=PairSpec(8, 20, (5, 40), 96),
        throughput_batch=(4, 2),
        runs=(  # every forward mode and every recompute setting, in 4 runs
            ("packed@192", "full"),
            ("concatenated", "none"),
            ("prefix_shared@192", "selective"),
            ("separate", "full"),
        ),
        warmup=1,
        steps=1,
        syncs_model={"num_hidden_layers": 2},
        packed_mode="packed@192",
        compile_warmup=1,
    ),
}


# ----------------------------------------------------------------------------------------------
# The check: output folder, time caps, shared state


class Check:
    """What the phases share: the output folder, the size, the device and its compute dtype,
    the process group (started on first use) and the current phase's deadline."""

    def __init__(self, out: Path, size: CheckSize) -> None:
        self.out, self.size = out, size
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.deadline = math.inf
        self._world: World | None = None
        self._peak: Peak | None = None
        self._model_configs: dict[str, Any] = {}
        self._pad_id: int | None = None
        # the runs' compute dtype (the recipe's `parallel.mixed_precision`: bf16 on CUDA)
        self.dtype = compute_dtype(self.config(size.numerics_pairs, (1, 1)).parallel, self.device)

    @property
    def world(self) -> World:
        if self._world is None:
            self._world = init_distributed()
        return self._world

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def peak(self) -> Peak:
        """The MFU denominator (`engine.metrics.device_peak` in the compute dtype), measured once."""
        if self._peak is None:
            self._peak = device_peak(self.device, self.dtype, matmul_peak(self.device, self.dtype))
        return self._peak

    def model_config(self, overrides: dict[str, Any]):
        """The Hugging Face config `engine.bench.common.build_causal_lm` builds for `overrides` (built
        on the meta device: no memory, no init)."""
        key = json.dumps(overrides, sort_keys=True)
        if key not in self._model_configs:
            with torch.device("meta"):
                model = common.build_causal_lm(self.config(self.size.numerics_pairs, (1, 1)), overrides)
            self._model_configs[key] = model.config
        return self._model_configs[key]

    @property
    def pad_id(self) -> int:
        """The recipe tokenizer's padding id."""
        if self._pad_id is None:
            from engine.model import build_tokenizer

            self._pad_id = build_tokenizer(self.config(self.size.numerics_pairs, (1, 1)).model).pad_token_id
        return self._pad_id

    def config(self, pairs: PairSpec, batch: tuple[int, int], *overrides: str) -> Config:
        """The demo recipe with this check's shapes (its data files are never read)."""
        global_batch, micro = batch
        return load_config(
            RECIPE,
            [
                f"data.max_length={pairs.max_length}",
                f"training.global_batch_size={global_batch}",
                f"training.micro_batch_size={micro}",
                *overrides,
            ],
        )

    def write(self, name: str, record: dict[str, Any]) -> None:
        """OUT/<name>.json, replaced atomically (a kill mid-write leaves the previous one)."""
        path = self.out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
        tmp.replace(path)


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors and numbers as Python numbers, non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _error(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _free(device: torch.device) -> None:
    """Return the CUDA caching allocator's free blocks, so that the next run's reserved memory is
    its own (on the CPU nothing is cached; a collection of the heap would cost ~0.5 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# 1. environment


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str, attribute: str | None = None) -> dict[str, Any]:
    """Whether `module` (and its `attribute`) imports, with the error text when not (an
    ABI-broken flash-attn raises something other than ImportError)."""
    try:
        found = importlib.import_module(module)
        target = getattr(found, attribute) if attribute else found
    except Exception as e:
        return {"importable": False, "import_error": f"{type(e).__name__}: {e}"[:500]}
    info: dict[str, Any] = {"importable": True}
    if callable(target) and attribute:
        info["parameters"] = list(inspect.signature(target).parameters)
    return info


def _sdpa_probes(device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int]) -> dict[str, Any]:
    """Which sdpa backends run (forward + backward) causal GQA, and a bottom-right bool mask
    (as a prefix-shared rejected block needs), at the check's head shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, kv, d = heads
    t = 256
    q = torch.randn(1, h, t // 2, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv, t, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv, t, d, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(t // 2, t, dtype=torch.bool, device=device).tril(t // 2)
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "causal_gqa": lambda: F.scaled_dot_product_attention(
            q, k[:, :, : t // 2], v[:, :, : t // 2], is_causal=True, enable_gqa=True
        ),
        "masked_bottom_right": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1), attn_mask=mask
        ),
    }
    results: dict[str, Any] = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if not hasattr(SDPBackend, backend):
            continue
        results[backend.lower()] = {}
        for case, run in cases.items():
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run().sum().backward()
                results[backend.lower()][case] = "ok"
            except Exception as e:  # an unsupported combination is an answer, not a failure
                results[backend.lower()][case] = first_line(e)[:200]
    return results


def phase_environment(check: Check, record: dict[str, Any]) -> None:
    device, size = check.device, check.size
    record["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{
            p: _version(p)
            for p in ("transformers", "peft", "flash_attn", "triton", "safetensors", "pyarrow", "datasets")
        },
    }
    record["device"] = {
        "type": device.type,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["device"].update(
            name=props.name,
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=props.total_memory / GIB,
            count=torch.cuda.device_count(),
        )
    record["settings"] = {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "env": {
            k: os.environ.get(k)
            for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "CC", "CXX")
        },
    }
    rates = {n: measure_matmul_flops(device, torch.bfloat16, n) for n in size.matmul_sizes}
    best = max(rates.values())
    peak = device_peak(device, torch.bfloat16, (best, "bfloat16"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    record["matmul_bf16"] = {
        "flops": {f"{n}^3": r for n, r in rates.items()},
        "best": best,
        "table_peak": table_peak(name, torch.bfloat16) if name else None,
        "peak_flops": peak.flops,
        "peak_source": peak.why,
        "best_over_peak": best / peak.flops,
    }
    record["kernels"] = {
        "engine_available": sorted(attention.available_kernels(device.type)),
        "torch_varlen_attn": _importable("torch.nn.attention.varlen", "varlen_attn"),
        "flex_attention": _importable("torch.nn.attention.flex_attention", "flex_attention"),
        "flash_attn": {
            **_importable("flash_attn", "flash_attn_varlen_func"),
            "version": _version("flash_attn"),
        },
        "flash_sdp_available": bool(
            getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)()
        ),
    }
    for label, overrides in (("numerics", size.numerics_model), ("throughput", size.throughput_model)):
        config = check.model_config(overrides)
        record["kernels"][f"plan_{label}_model"] = attention.kernel_plan(config, device, check.dtype)
    record["sdpa_backends"] = _sdpa_probes(device, check.dtype, size.attention_heads)
    record["headline"] = {
        "device": record["device"].get("name", "cpu"),
        "torch": torch.__version__,
        "matmul_bf16_best": format_rate(best),
        "best_over_peak": round(best / peak.flops, 3),
        "kernels": record["kernels"]["engine_available"],
    }


# ----------------------------------------------------------------------------------------------
# 2. numerics


def _token_logps(model: torch.nn.Module, mode: str, batch, pad_id: int, device: torch.device) -> torch.Tensor:
    """Per-token log-probs [N] of `batch` laid out by `mode`: each scored position made its own
    sequence of the layout's inputs, through the model's forward."""
    from engine.forward import FORWARD_MODES

    parts = []
    for inputs in FORWARD_MODES[mode].layout(batch, pad_id, device):
        n = inputs.score_sequences.shape[0]
        inputs.score_sequences = torch.arange(n, device=device)
        inputs.sequence_tokens = torch.ones(n, dtype=torch.long, device=device)
        parts.append(model(**vars(inputs)).logps)
    return torch.cat(parts).double().cpu()


def _scale_logits(causal_lm: torch.nn.Module, ids: list[int], std: float) -> dict[str, float]:
    """Scale the LM head so the logits of `ids` have standard deviation `std`."""
    with torch.no_grad():
        before = causal_lm(input_ids=torch.tensor([ids])).logits.float().std().item()
        causal_lm.get_output_embeddings().weight.mul_(std / before)
        after = causal_lm(input_ids=torch.tensor([ids])).logits.float().std().item()
    return {"before": before, "after": after}


def _delta_stats(delta: torch.Tensor) -> dict[str, float]:
    a = delta.abs()
    return {
        "mean_abs": a.mean().item(),
        "p99_abs": a.quantile(0.99).item(),
        "max_abs": a.max().item(),
        "mean": delta.mean().item(),
    }


def _step0(model, mode: str, pairs: list[common.Pair], cfg: Config, pad_id: int, device) -> dict[str, float]:
    """Step 0 of DPO: reference log-probs scored as the trainer scores them (its layout, its
    batch of 4 x micro-batch pairs, eval mode), the policy's in `mode`'s micro-batches."""
    from engine.forward import policy_logps
    from engine.losses import compute_loss
    from engine.reference import reference_layout

    t = cfg.training
    ref_batch = cfg.reference.batch_size or 4 * t.micro_batch_size

    def chunks(size: int) -> list[list[int]]:
        return [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)]

    with torch.no_grad():  # the policy's forward as the trainer's, without its backward
        model.eval()
        ref = [
            policy_logps(
                reference_layout(mode), model, common.pair_batch([pairs[i] for i in ids], ids), pad_id, device
            )
            for ids in chunks(ref_batch)
        ]
        model.train()
        ref_c = torch.cat([r.chosen_logps for r in ref])
        ref_r = torch.cat([r.rejected_logps for r in ref])
        losses, correct, logratios = [], [], []
        for ids in chunks(t.micro_batch_size):
            logps = policy_logps(mode, model, common.pair_batch([pairs[i] for i in ids], ids), pad_id, device)
            logps.ref_chosen_logps, logps.ref_rejected_logps = ref_c[ids], ref_r[ids]
            out = compute_loss(logps, cfg.loss)
            losses.append(out.losses.double())
            correct.append((out.chosen_rewards > out.rejected_rewards).double())
            logratios.append((logps.chosen_logps - ref_c[ids]) - (logps.rejected_logps - ref_r[ids]))
    loss = torch.cat(losses).mean().item()
    return {
        "loss": loss,
        "ln2_minus_loss": LN2 - loss,
        "accuracy": torch.cat(correct).mean().item(),
        "max_abs_logratio": torch.cat(logratios).abs().max().item(),
    }


def phase_numerics(check: Check, record: dict[str, Any]) -> None:
    from engine.forward import FORWARD_MODES, policy_logps
    from engine.step import build_model

    size, device, world = check.size, check.device, check.world
    spec = size.numerics_pairs
    batch = (spec.count, size.numerics_micro)
    cfgs = {p: check.config(spec, batch, f"parallel.mixed_precision={p}") for p in ("fp32", "bf16")}
    causal_lm = common.build_causal_lm(cfgs["fp32"], size.numerics_model)
    pad_id = check.pad_id
    pairs = spec.make(causal_lm.config.vocab_size, cfgs["fp32"].job.seed)
    sample = [token for pair in pairs for part in pair for token in part][: spec.max_length]
    record["logit_std"] = _scale_logits(causal_lm, sample, 6.0)
    record["params"] = sum(p.numel() for p in causal_lm.parameters())
    record["pairs"] = {"count": len(pairs), "tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)}
    models = {p: build_model(cfg, world, copy.deepcopy(causal_lm))[0] for p, cfg in cfgs.items()}
    record["kernels"] = {
        p: attention.kernel_plan(causal_lm.config, device, dt)
        for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    everything = common.pair_batch(pairs, list(range(len(pairs))))

    with torch.no_grad():
        sums = {m: policy_logps(m, models["fp32"], everything, pad_id, device) for m in FORWARD_MODES}
    base = torch.cat([sums["concatenated"].chosen_logps, sums["concatenated"].rejected_logps]).double()
    fp32_modes = {}
    for mode, logps in sums.items():
        values = torch.cat([logps.chosen_logps, logps.rejected_logps]).double()
        rel = ((values - base).abs() / base.abs().clamp(min=1e-12)).max().item()
        fp32_modes[mode] = {"max_rel_diff": rel, "agree": rel <= FP32_MODES_REL_TOL}
    record["fp32_modes"] = fp32_modes
    record["fp32_modes_agree"] = all(m["agree"] for m in fp32_modes.values())

    bf16_vs_fp32 = {}
    with torch.no_grad():
        for mode in FORWARD_MODES:
            tokens = {p: _token_logps(models[p], mode, everything, pad_id, device) for p in models}
            seq = policy_logps(mode, models["bf16"], everything, pad_id, device)
            seq16 = torch.cat([seq.chosen_logps, seq.rejected_logps]).double().cpu()
            seq32 = torch.cat([sums[mode].chosen_logps, sums[mode].rejected_logps]).double().cpu()
            bf16_vs_fp32[mode] = {
                "tokens": tokens["fp32"].numel(),
                "per_token": _delta_stats(tokens["bf16"] - tokens["fp32"]),
                "per_sequence_sum": _delta_stats(seq16 - seq32),
            }
    record["bf16_vs_fp32"] = bf16_vs_fp32
    record["step0"] = {
        p: {mode: _step0(models[p], mode, pairs, cfgs[p], pad_id, device) for mode in FORWARD_MODES}
        for p in models
    }
    record["headline"] = {
        "fp32_modes_agree": record["fp32_modes_agree"],
        "fp32_modes_max_rel_diff": max(m["max_rel_diff"] for m in fp32_modes.values()),
        "bf16_token_delta_max": max(m["per_token"]["max_abs"] for m in bf16_vs_fp32.values()),
        "bf16_step0_ln2_minus_loss": {m: r["ln2_minus_loss"] for m, r in record["step0"]["bf16"].items()},
    }
    del models
    _free(device)


# ----------------------------------------------------------------------------------------------
# 3. attention


def _lengths(total: int, parts: int, generator: torch.Generator) -> list[int]:
    """`parts` positive lengths summing to `total`, each within 0.5x-1.5x of the mean."""
    weights = 0.5 + torch.rand(parts, generator=generator)
    lengths = (weights / weights.sum() * total).floor().long().clamp(min=1).tolist()
    lengths[-1] += total - sum(lengths)
    return lengths


def _attention_rows(
    size: CheckSize, seed: int
) -> dict[str, tuple[Callable[[], attention.AttentionSegments], torch.Tensor]]:
    """The rows attended: (a factory of their `AttentionSegments`, the [T, T] bool mask of what
    each query sees, built here from the lengths alone)."""
    g = torch.Generator().manual_seed(seed)
    t = size.attention_tokens
    lengths = _lengths(t, size.attention_sequences, g)
    packed = torch.zeros(t, t, dtype=torch.bool)
    start = 0
    for n in lengths:
        packed[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    triples = []
    for n in _lengths(t, size.attention_triples, g):
        p = max(1, int(n * (0.3 + 0.2 * torch.rand(1, generator=g).item())))
        c = max(1, (n - p) // 2 + int((n - p) * 0.2 * (torch.rand(1, generator=g).item() - 0.5)))
        triples.append((p, c, n - p - c))
    shared = torch.zeros(t, t, dtype=torch.bool)
    start = 0
    for p, c, r in triples:
        shared[start : start + p + c, start : start + p + c] = torch.ones(
            p + c, p + c, dtype=torch.bool
        ).tril()
        rejected = start + p + c
        shared[rejected : rejected + r, start : start + p] = True  # the whole prompt
        shared[rejected : rejected + r, rejected : rejected + r] = torch.ones(r, r, dtype=torch.bool).tril()
        start = rejected + r
    return {
        "packed": (lambda: attention.AttentionSegments.for_sequences(lengths), packed),
        "prefix_shared": (lambda: attention.AttentionSegments.for_shared_prefix(triples), shared),
    }


def _timed_ms(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `run` (CUDA events on CUDA, perf_counter on CPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def _max_error(value: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    error = (value.float() - reference).abs().max().item()
    return {"max_abs": error, "max_rel": error / max(reference.abs().max().item(), 1e-30)}


def _measure_kernel(
    kernel: str,
    make: Callable[[], attention.AttentionSegments],
    inputs: tuple[torch.Tensor, ...],
    reference: dict[str, torch.Tensor],
    check: Check,
) -> dict[str, Any]:
    """Errors against `reference` and times of `kernel` on one row."""
    device, dtype = check.device, check.dtype
    q0, k0, v0, grad = inputs
    segments = make()
    tensors = segments.prepare(device, kernel)
    d = q0.shape[-1]
    needs = attention.LayerNeeds(half=dtype in (torch.float16, torch.bfloat16), head_dim=d)
    q, k, v = (x.detach().requires_grad_() for x in (q0, k0, v0))

    def forward() -> torch.Tensor:
        return attention.segment_attention(None, q, k, v, segments, scaling=d**-0.5)

    def forward_backward() -> None:
        for x in (q, k, v):
            x.grad = None
        forward().backward(grad)

    first = time.perf_counter()
    out = forward()
    out.backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result: dict[str, Any] = {
        "served_by": attention.choose_kernel(tensors.available, needs, kernel),
        "first_call_s": time.perf_counter() - first,
        "output": _max_error(out, reference["out"]),
        **{f"d{n}": _max_error(x.grad, reference[n]) for n, x in (("q", q), ("k", k), ("v", v))},
    }
    with torch.no_grad():
        forward()  # warm
        result["forward_ms"] = _timed_ms(forward, device, check.size.attention_repeats)
    forward_backward()
    result["forward_backward_ms"] = _timed_ms(forward_backward, device, check.size.attention_repeats)
    pairs = segments.visible_pairs()
    result["tflops_forward_backward"] = (
        12 * q.shape[1] * d * pairs / (result["forward_backward_ms"] / 1e3) / 1e12
    )
    return result


def phase_attention(check: Check, record: dict[str, Any]) -> None:
    device, dtype, size = check.device, check.dtype, check.size
    h, kv, d = size.attention_heads
    t = size.attention_tokens
    kernels = [k for k in attention.KERNELS if k in attention.available_kernels(device.type)]
    record.update(heads=h, kv_heads=kv, head_dim=d, tokens=t, dtype=str(dtype), kernels=kernels, rows={})
    g = torch.Generator(device="cpu").manual_seed(0)
    headline = {}
    for row, (make, mask) in _attention_rows(size, 0).items():
        segments = make()
        info: dict[str, Any] = {
            "blocks": len(segments.blocks),
            "query_lengths": segments.query_lengths,
            "key_lengths": segments.key_lengths,
            "pairs_attended": segments.visible_pairs(),
            "mask_pairs": int(mask.sum()),  # must equal pairs_attended
        }
        record["rows"][row] = info  # written after each kernel
        # inputs rounded to the compute dtype; the reference sees the same rounded values in fp32
        q0, k0, v0 = (torch.randn(1, n, t, d, generator=g).to(device, dtype) for n in (h, kv, kv))
        grad = torch.randn(1, t, h, d, generator=g).to(device, dtype)
        q, k, v = (x.float().requires_grad_() for x in (q0, k0, v0))
        out = F.scaled_dot_product_attention(
            q,
            k.repeat_interleave(h // kv, 1),
            v.repeat_interleave(h // kv, 1),
            attn_mask=mask.to(device),
            scale=d**-0.5,
        ).transpose(1, 2)
        out.backward(grad.float())
        reference = {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad}
        for kernel in kernels:
            if check.time_left() <= 0:
                info[kernel] = {"skipped": "phase time cap"}
                continue
            try:
                info[kernel] = _measure_kernel(kernel, make, (q0, k0, v0, grad), reference, check)
                headline[f"{row}/{kernel}"] = {
                    "served_by": info[kernel]["served_by"],
                    "max_rel_error": max(info[kernel][x]["max_rel"] for x in ("output", "dq", "dk", "dv")),
                    "forward_backward_ms": info[kernel]["forward_backward_ms"],
                }
            except Exception as e:
                info[kernel] = _error(e)
            check.write("attention", record)
        del reference, out, q, k, v
        _free(device)
    record["headline"] = headline


# ----------------------------------------------------------------------------------------------
# 4. throughput (and the runs the syncs and compile phases time)


def _run(
    check: Check,
    mode: str,
    ac: str,
    model: dict[str, Any],
    *,
    compile: bool = False,
    warmup: int | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """One `engine.bench.modes.run_mode` run of `mode` (`engine.bench.modes.parse_mode`'s syntax) with
    `parallel.activation_checkpointing` = `ac`, summarised as the bench summarises it, with peak
    memory against the dry run's estimate."""
    from engine.plan import estimate_memory, measure_model

    size, device, world = check.size, check.device, check.world
    cfg = check.config(
        size.throughput_pairs,
        size.throughput_batch,
        f"parallel.activation_checkpointing={ac}",
        f"parallel.compile={str(compile).lower()}",
    )
    layout, budget = modes.parse_mode(mode, cfg)  # the recipe's layout, for the memory estimate
    cfg = dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, forward_mode=layout, micro_batch_tokens=budget)
    )
    hf_config = check.model_config(model)
    pairs = size.throughput_pairs.make(hf_config.vocab_size, cfg.job.seed)
    warmup = size.warmup if warmup is None else warmup
    steps = size.steps if steps is None else steps
    setup = modes.Setup(cfg, pairs, check.pad_id, steps, warmup, 1, model)
    _free(device)
    start = time.perf_counter()
    raw = modes.run_mode(mode, setup, world, range(warmup, warmup + steps))
    wall = time.perf_counter() - start
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    row = modes.summarize(raw, check.peak().flops, world.world_size)
    estimate = estimate_memory(cfg, measure_model(hf_config, cfg.lora), 1, 1, device.type)
    row.update(
        mode=mode,
        activation_checkpointing=ac,
        compile=compile,
        compile_stats=row.pop("compile", None),  # the bench's: compile time, graphs, breaks, recompiles
        params=raw["params"],
        step_times_s=raw["step_times_s"],
        build_and_warmup_s=wall - sum(raw["step_times_s"]),
        model_tflops=row["model_flops_per_step"] / row["step_time_s"] / 1e12,
        peak_allocated_gib=row.pop("peak_mem_gib"),
        peak_reserved_gib=reserved,
        estimate_gib=estimate.device_total / GIB,
        estimate_items_gib={i.name: i.bytes / GIB for i in estimate.items},
        attention_kernels=attention.kernel_plan(
            hf_config, device, check.dtype, cfg.training.attention_kernel
        ),
    )
    row["allocated_over_estimate"] = row["peak_allocated_gib"] / row["estimate_gib"]
    return row


def phase_throughput(check: Check, record: dict[str, Any]) -> None:
    size = check.size
    peak = check.peak()
    record.update(
        model=size.throughput_model,
        pairs=vars(size.throughput_pairs),
        global_batch=size.throughput_batch[0],
        micro_batch=size.throughput_batch[1],
        warmup=size.warmup,
        steps=size.steps,
        peak_flops=peak.flops,
        peak_source=peak.why,
        matmul_flops=peak.measured,
        runs=[],
    )
    for mode, ac in size.runs:
        if check.time_left() <= 0:
            record["runs"].append({"mode": mode, "activation_checkpointing": ac, "skipped": "phase time cap"})
            continue
        log(f"gpu check: throughput {mode}, activation_checkpointing={ac}")
        try:
            record["runs"].append(_run(check, mode, ac, size.throughput_model))
        except Exception as e:
            record["runs"].append({"mode": mode, "activation_checkpointing": ac, **_error(e)})
        check.write("throughput", record)
    done = [r for r in record["runs"] if "mfu" in r]
    best = max(done, key=lambda r: r["mfu"], default=None)
    record["headline"] = {
        "runs": f"{len(done)} of {len(size.runs)}",
        "best": None
        if best is None
        else f"{best['mode']} / {best['activation_checkpointing']}: {best['mfu']:.1%} MFU, {best['tokens_per_s']:.0f} tokens/s",
    }


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """The throughput runs as a README-ready markdown table."""
    lines = [
        "| mode | recompute | tokens/s | step s | MFU | model TFLOP/s | peak alloc GiB | peak reserved GiB | estimate GiB | attention |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        if "mfu" not in r:
            why = r.get("skipped") or r.get("error", "").splitlines()[0][:80]
            lines.append(f"| {r['mode']} | {r['activation_checkpointing']} | {why} | | | | | | | |")
            continue
        reserved = "" if r["peak_reserved_gib"] is None else f"{r['peak_reserved_gib']:.2f}"
        kernels = ", ".join(sorted(set(r["attention_kernels"].values())))
        lines.append(
            f"| {r['mode']} | {r['activation_checkpointing']} | {r['tokens_per_s']:.0f} | {r['step_time_s']:.3f} | "
            f"{r['mfu']:.1%} | {r['model_tflops']:.3g} | {r['peak_allocated_gib']:.2f} | {reserved} | "
            f"{r['estimate_gib']:.2f} | {kernels} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# 5. syncs


def _short(filename: str) -> str:
    """A file name from the package root on: engine/step.py, torch/distributed/..."""
    parts = Path(filename).parts
    for root in ("engine", "torch", "transformers", "tests"):
        if root in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(root) :])
    return Path(filename).name


@contextlib.contextmanager
def sync_warnings() -> Iterator[Counter]:
    """Count CUDA synchronisations by file:line under `torch.cuda.set_sync_debug_mode("warn")`."""
    seen: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen.update(f"{_short(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


@contextlib.contextmanager
def value_reads() -> Iterator[Counter]:
    """Count the reads of tensor values into Python (each would wait for a GPU), by kind and
    file:function, with `engine.syncs.ReadCounter` (a torch function mode)."""
    from engine.syncs import ReadCounter

    seen: Counter = Counter()
    counter = ReadCounter()
    with counter:
        yield seen
    seen.update({f"{kind} {site}": n for (kind, site), n in counter.reads.items()})


def _sync_counter(device: torch.device) -> tuple[str, Callable[[], contextlib.AbstractContextManager]] | None:
    """(what is counted, a context manager counting it) on this device, or None."""
    if device.type == "cuda":
        return "CUDA synchronisations (set_sync_debug_mode warnings) by file:line", sync_warnings
    return "value reads (engine.syncs.ReadCounter) by kind and file:function", value_reads


def phase_syncs(check: Check, record: dict[str, Any]) -> None:
    size = check.size
    record["mode"] = size.packed_mode
    found = _sync_counter(check.device)
    if found is None:
        record.update(per_step="n/a on CPU", why="no CUDA here, and no tests/test_syncs.py to count reads")
        record["headline"] = {"per_step": "n/a on CPU"}
        return
    record["counted"], counting = found
    counts = []
    for steps in (1, 2):  # their difference is one step, without the build and the warm-up
        with counting() as seen:
            _run(check, size.packed_mode, "full", size.syncs_model, steps=steps)
        counts.append(seen)
    per_step = counts[1] - counts[0]
    record.update(
        model=size.syncs_model,
        per_step=sum(per_step.values()),
        per_step_by_site=dict(per_step.most_common()),
        build_warmup_and_one_step=sum(counts[0].values()),
        build_warmup_and_one_step_by_site=dict(counts[0].most_common(40)),
    )
    record["headline"] = {"per_step": record["per_step"], "top": dict(per_step.most_common(5))}


# ----------------------------------------------------------------------------------------------
# 6. compile


def phase_compile(check: Check, record: dict[str, Any]) -> None:
    from torch._dynamo.utils import counters

    size = check.size
    record["mode"] = size.packed_mode
    record["eager"] = _run(check, size.packed_mode, "none", size.throughput_model, warmup=size.compile_warmup)
    check.write("compile", record)
    record["compiled"] = _run(
        check, size.packed_mode, "none", size.throughput_model, compile=True, warmup=size.compile_warmup
    )
    # the bench's compiled run starts dynamo's counters afresh (engine.parallel.reset_compile_stats)
    # and reports its own compile time, graphs, graph breaks and recompiles
    record["compile_stats"] = record["compiled"]["compile_stats"] or "n/a: the bench reported none"
    record["graph_break_reasons"] = dict(Counter(counters["graph_break"]).most_common(20))
    eager, compiled = record["eager"], record["compiled"]
    record["speedup"] = eager["step_time_s"] / compiled["step_time_s"]
    record["extra_build_and_warmup_s"] = compiled["build_and_warmup_s"] - eager["build_and_warmup_s"]
    record["headline"] = {
        "speedup": round(record["speedup"], 3),
        "compiled_mfu": compiled["mfu"],
        "extra_build_and_warmup_s": round(record["extra_build_and_warmup_s"], 1),
        "compile_stats": record["compile_stats"],
    }


# ----------------------------------------------------------------------------------------------
# The run

PHASE_FUNCTIONS: dict[str, Callable[[Check, dict[str, Any]], None]] = {
    "environment": phase_environment,
    "numerics": phase_numerics,
    "attention": phase_attention,
    "throughput": phase_throughput,
    "syncs": phase_syncs,
    "compile": phase_compile,
}
CPU_COMPILE = (
    "on CPU the compile phase runs only when --gpu-check-phases names it "
    "(Inductor's C++ build of even the tiny model takes tens of seconds)"
)


def _item_errors(value: Any) -> int:
    """Errors recorded inside a phase's items (a kernel, a run)."""
    if isinstance(value, dict):
        return ("error" in value) + sum(_item_errors(v) for v in value.values())
    if isinstance(value, list):
        return sum(_item_errors(v) for v in value)
    return 0


def selected_phases(text: str, device_type: str) -> list[str]:
    """The phases `--gpu-check-phases` names (all when empty; on CPU all but compile)."""
    if not text:
        return [p for p in PHASES if device_type == "cuda" or p != "compile"]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        raise UserError(f"--gpu-check-phases: unknown phase {unknown[0]!r} (phases: {', '.join(PHASES)})")
    return [p for p in PHASES if p in names]


def run_gpu_check(out_dir: str | Path, size: str = "auto", phases: str = "") -> dict[str, Any]:
    """Run the check's phases into `out_dir` (see the module docstring); returns the summary."""
    cuda = torch.cuda.is_available()
    if size not in ("auto", *SIZES):
        raise UserError(f"--gpu-check-size: expected auto, {', '.join(SIZES)}; got {size!r}")
    chosen = SIZES[("full" if cuda else "tiny") if size == "auto" else size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, chosen)
    todo = selected_phases(phases, check.device.type)
    begin = time.perf_counter()
    end = begin + sum(chosen.budgets_s[p] for p in todo)
    summary: dict[str, Any] = {"size": chosen.name, "device": str(check.device), "phases": {}}
    for name in PHASES:
        cap = chosen.budgets_s[name]
        record: dict[str, Any] = {"phase": name, "size": chosen.name, "budget_s": cap}
        now = time.perf_counter()
        if name not in todo:
            record.update(
                status="skipped",
                reason=CPU_COMPILE if not phases and name == "compile" else "not in --gpu-check-phases",
            )
        elif now > end:
            record.update(status="skipped", reason="the check's total budget was spent")
        else:
            log(f"gpu check: {name} (cap {cap:.0f} s)")
            check.deadline = now + cap
            record.update(status="running", started_at_s=now - begin)
            try:
                PHASE_FUNCTIONS[name](check, record)
                errors = _item_errors(record)
                record["status"] = "partial" if errors else "ok"
            except Exception as e:
                record.update(status="error", **_error(e))
            record["seconds"] = time.perf_counter() - now
        check.write(name, record)
        summary["phases"][name] = {
            k: record[k]
            for k in ("status", "seconds", "budget_s", "reason", "error", "headline")
            if k in record
        }
        summary["total_s"] = time.perf_counter() - begin
        check.write("summary", summary)
    table = ""
    if (out / "throughput.json").exists():
        runs = json.loads((out / "throughput.json").read_text()).get("runs", [])
        table = markdown_table(runs) if runs else ""
    (out / "summary.md").write_text(
        f"# fsdpo GPU check ({chosen.name}, {summary['device']})\n\n" + (table or "No throughput runs.\n")
    )
    for name, row in summary["phases"].items():
        print(
            f"{name:12s} {row['status']:8s} {row.get('seconds', 0):7.1f} s  {row.get('error') or row.get('reason') or ''}"
        )
    print(f"gpu check: {summary['total_s']:.1f} s; files in {out}")
    return summary
