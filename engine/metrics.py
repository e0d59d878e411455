"""Metric reduction across ranks, throughput and MFU, and the sinks (console, JSONL, wandb).

Per-pair values are summed locally over the micro-batches of the logging window and reduced with
one all-reduce of a single vector per log step; means are taken over the global pair count, so
the numbers do not depend on how a batch was split across ranks and micro-batches.

Model FLOPs and MFU: one count (`model_flops` of the `engine.forward.forward_work` of a forward mode's
micro-batches), used by the trainer's rows, the bench and the dry run. Per optimizer step:
- linear layers: (4 x B + 2 x T) x positions computed, B the non-embedding parameters (all but
  the input embedding and the LM head; of a mixture of experts only the experts a token is
  routed to) and T the trained ones among them: forward 2 B, the activation gradient 2 B, the
  weight gradient 2 T; without adapters T = B and this is the usual 6 B. Positions computed
  include padding (every linear layer runs over it) and count a shared prompt once
  (`prefix_shared`);
- attention: 12 x layers x query heads x head dim x (query, key) pairs attended (QK^T and AV,
  forward and backward). Packed rows: `AttentionSegments.visible_pairs`. Padded rows: the causal
  triangle of each row's real length, the work flash-attn's variable-length path does; kernels
  that also compute the masked padding scores (sdpa with a mask, eager) are not credited with
  them. Sliding windows are not applied (a windowed layer counts as fully causal);
- LM head: (4 x H + 2 x H trained) x positions scored, H = hidden x vocab: fsdpo scores the
  completion positions only (one per completion token; prefix sharing's last prompt position
  twice, as the engine scores it twice) and never the prompt or padding. A tied head counts
  here once and not among the non-embedding parameters.
No recompute is counted (this is MFU, not HFU): neither activation checkpointing's second
forward of a block nor the chunked LM head's second forward of each chunk in backward
(2 x H per scored position with `training.logprob_chunk_tokens` > 0). Elementwise work
(norms, softmax, rotary, the loss) is not counted either.

The peak (`device_peak`): on CUDA the vendor's dense (not 2:4 sparse) tensor-core rate of a
known device in the compute dtype (`DEVICE_PEAKS`, matched by `torch.cuda.get_device_name()`),
else, and on CPU, the measured matmul rate (`matmul_peak`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import LoggingConfig
from engine.forward import Work, forward_work, to_device
from engine.losses import LossOutput, PreferenceLogps
from engine.run_dir import RunDir


class PairMetrics:
    """Sums of per-pair metrics over valid pairs, kept on the device: `add` launches a few
    kernels and reads nothing back, `reduce` reads them once (one all-reduce of one vector).

    Unpaired examples (`PreferenceLogps.desirable`, kto): rewards/chosen and logps/chosen are
    the means over the desirable examples, rewards/rejected and logps/rejected over the
    undesirable ones (TRL's KTOTrainer's), "kto/desirable" the desirable share; a metric whose
    examples the window lacks is left out. There is no pair to compare, so rewards/accuracies
    and rewards/margins are not reported; logps/kl is the KL sequences' mean log-prob (left out
    for a loss without them, apo_zero_unpaired)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        # [2 names + 1] fp64: each metric's sum, then each one's count of pairs (its own for the
        # desirable or undesirable examples' means), then the pairs
        self.sums: torch.Tensor | None = None
        self.tokens = 0  # real (non-pad) tokens read, for throughput (counted on the host)

    def add(self, losses: torch.Tensor, out: LossOutput, logps: PreferenceLogps, valid: torch.Tensor) -> None:
        """Add a micro-batch's per-pair values; `valid` [B] on their device (0: padding pair)."""
        v = valid.to(losses.device, torch.float64)
        over = {}  # metric -> the pairs it averages over, where not all
        if logps.desirable is None:
            values = {
                "loss": losses.detach(),
                "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.rejected_rewards,
                "rewards/accuracies": out.chosen_rewards > out.rejected_rewards,
                "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                "logps/chosen": logps.chosen_logps.detach(),
                "logps/rejected": logps.rejected_logps.detach(),
                **out.extras,
            }
        else:
            d = logps.desirable.to(torch.float64)
            completion = logps.chosen_logps.detach()
            values = {
                "loss": losses.detach(),
                "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.chosen_rewards,
                "logps/chosen": completion,
                "logps/rejected": completion,
                "logps/kl": logps.rejected_logps.detach(),
                "kto/desirable": d,
                **out.extras,
            }
            over = {
                "rewards/chosen": d,
                "logps/chosen": d,
                "rewards/rejected": 1 - d,
                "logps/rejected": 1 - d,
                "logps/kl": (logps.rejected_tokens > 0).to(torch.float64),  # none: no KL sequences
            }
        if self.sums is not None and list(values) != self.names:
            raise ValueError(f"metrics {list(values)} added to a window of {self.names}")
        self.names = list(values)
        stacked = torch.stack([value.detach().to(torch.float64) for value in values.values()])  # [K, B]
        weights = torch.stack([over[name] * v if name in over else v for name in values])  # [K, B]
        sums = torch.cat([(stacked * weights).sum(1), weights.sum(1), v.sum().unsqueeze(0)])
        self.sums = sums if self.sums is None else self.sums + sums

    def reduce(self, device: torch.device, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Global means of every metric, plus `extra` values summed across ranks (one all-reduce
        and one read: the only point where the host waits for the window's work)."""
        extra = extra or {}
        sums = self.sums if self.sums is not None else torch.zeros(1, dtype=torch.float64)
        extras = torch.tensor(list(extra.values()), dtype=torch.float64)
        vector = torch.cat([sums.to(device), to_device(extras, device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vector)
        values = vector.tolist()
        k = len(self.names)
        pairs = values[2 * k] if k else values[0]
        means = {
            n: values[i] / max(values[k + i], 1.0)
            for i, n in sorted(enumerate(self.names), key=lambda x: x[1])
            if values[k + i] > 0 or pairs == 0
        }
        summed = dict(zip(extra, values[2 * k + 1 :] if k else values[1:]))
        return {**means, **summed, "pairs": pairs}


# ----------------------------------------------------------------------------------------------
# Model FLOPs (see the module docstring)


@dataclass(frozen=True)
class ModelShape:
    """The sizes model FLOPs are counted from (`model_shape`)."""

    body: int  # non-embedding parameters a token goes through: all but input embedding and LM head
    body_trained: int  # of which trained
    head: int  # LM head weights (hidden x vocab), the input embedding's when tied
    head_trained: int
    layers: int
    attention_width: int  # query heads x head dim

    @property
    def per_position(self) -> int:
        """Linear-layer FLOPs per position computed, forward + backward."""
        return 4 * self.body + 2 * self.body_trained

    @property
    def per_scored(self) -> int:
        """LM-head FLOPs per position scored, forward + backward."""
        return 4 * self.head + 2 * self.head_trained


_EXPERTS = re.compile(r"(^|\.)experts\.")


def model_shape(model: torch.nn.Module) -> ModelShape:
    """`ModelShape` of a causal LM (Hugging Face, possibly under peft, FSDP or on the meta
    device). Of a mixture of experts' `experts` weights only the share routed to per token
    counts (num_experts_per_tok of num_local_experts / num_experts)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    routed = getattr(config, "num_experts_per_tok", None)
    share = routed / experts if experts and routed else 1.0
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = body_trained = 0.0
    for name, p in model.named_parameters():  # a tied weight is listed once
        if p is embedding or p is head:
            continue
        n = p.numel() * (share if _EXPERTS.search(name) else 1.0)
        body += n
        body_trained += n if p.requires_grad else 0.0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        body=round(body),
        body_trained=round(body_trained),
        head=head.numel(),
        head_trained=head.numel() if head.requires_grad else 0,
        layers=config.num_hidden_layers,
        attention_width=heads * head_dim,
    )


def model_flops(shape: ModelShape, work: Work) -> float:
    """Model FLOPs (forward + backward, no recompute) of `work` (see the module docstring)."""
    attention = 12 * shape.layers * shape.attention_width * work.attention_pairs
    return float(shape.per_position * work.positions + attention + shape.per_scored * work.scored)


def mfu(flops: float, seconds: float, peak_flops: float, ranks: int) -> float:
    """Model FLOPs utilisation: `flops` done by `ranks` ranks in `seconds`, over their peak."""
    return flops / max(seconds, 1e-9) / (peak_flops * ranks)


# ----------------------------------------------------------------------------------------------
# The peak

DEVICE_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    # (name pattern, dense bf16/fp16 tensor-core TFLOP/s, fp32 TFLOP/s without TF32 or None),
    # the vendors' datasheet figures; the first pattern found in the device name wins
    (r"\bH100 NVL\b", 835, 60),
    (r"\bH100 PCIe\b", 756, 51),
    (r"\bH100\b", 989, 67),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989, 67),
    (r"\bGH200\b", 989, 67),
    (r"\bH200 NVL\b", 835, 60),
    (r"\bH200\b", 989, 67),
    (r"\bGB200\b", 2500, None),
    (r"\bB200\b", 2250, None),
    (r"\bA100\b", 312, 19.5),
    (r"\bA800\b", 312, 19.5),
    (r"\bL40S\b", 362, 91.6),
    (r"\bL40\b", 181, 90.5),
    (r"\bL4\b", 121, 30.3),
    (r"\bA10\b", 125, 31.2),
    (r"\bRTX 4090\b", 165, 82.6),  # bf16 with fp32 accumulation
    (r"\bMI300X\b", 1307, 163.4),
)


@dataclass(frozen=True)
class Peak:
    """The MFU denominator per rank, and how it was chosen (for the start-up line)."""

    flops: float
    measured: float  # the measured matmul rate (`matmul_peak`), reported beside it
    why: str


def table_peak(name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the CUDA device `name` in `dtype` from `DEVICE_PEAKS`, or None."""
    if "MIG" in name:  # a slice of the device: a fraction of its peak
        return None
    for pattern, half, single in DEVICE_PEAKS:
        if re.search(pattern, name):
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            tf32 = torch.backends.cuda.matmul.allow_tf32
            return single * 1e12 if dtype == torch.float32 and single and not tf32 else None
    return None


def device_peak(device: torch.device, dtype: torch.dtype, measured: tuple[float, str]) -> Peak:
    """On CUDA the table's dense peak of this device in `dtype`, else (unknown device, a MIG
    slice, CPU) the `measured` matmul rate and its dtype (`matmul_peak`)."""
    rate, measured_dtype = measured
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, dtype)
        if peak is not None:
            why = f"{name}, dense {dtype_name} from the device table; measured matmul {format_rate(rate)}"
            return Peak(peak, rate, why)
        return Peak(
            rate, rate, f"measured matmul, {measured_dtype}: {name} {dtype_name} is not in the device table"
        )
    return Peak(rate, rate, f"measured matmul, {measured_dtype}")


def format_rate(flops: float) -> str:
    """FLOP/s with a unit: 989 TFLOP/s, 436 GFLOP/s."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOP/s"
    return f"{flops / 1e6:.3g} MFLOP/s"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """Achieved FLOP/s of a large square matmul on this device."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    repeats, start = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < 0.3:
        a @ b
        repeats += 1
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048) -> tuple[float, str]:
    """The measured matmul rate and the dtype it was measured in (the MFU denominator where
    `device_peak` has no table entry): the matmul rate of the compute dtype; on CPU the faster
    of it and fp32. A CPU without bf16 units can run a bf16 matmul far
    below its fp32 rate, and a bf16 peak there gave MFUs above 100%: the faster of the two bounds
    what the CPU's matmuls reach."""
    rate, name = measure_matmul_flops(device, dtype, size), str(dtype).removeprefix("torch.")
    if device.type == "cpu" and dtype != torch.float32:
        fp32 = measure_matmul_flops(device, torch.float32, size)
        if fp32 > rate:
            return fp32, f"float32, faster than {name} on this CPU"
    return rate, name


_MEASURED_PEAKS: dict[tuple, tuple[float, str]] = {}


def matmul_peak_once(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """`matmul_peak`, measured once per process and measuring function: the trainer's start-up
    measurement (a process that builds several trainers, as a test session does, pays the ~1 s
    probe once; a stand-in measuring function, as tests install, gets its own entry)."""
    key = (device, dtype, measure_matmul_flops)
    if key not in _MEASURED_PEAKS:
        _MEASURED_PEAKS[key] = handed_down_peak(device, dtype) or matmul_peak(device, dtype)
    return _MEASURED_PEAKS[key]


MATMUL_PEAK_ENV = "FSDPO_MATMUL_PEAK"


def handed_down_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str] | None:
    """Testing hook: FSDPO_MATMUL_PEAK="cpu:float32=6.7e10" is `matmul_peak` of this device type
    and dtype as the launching process measured it (same machine, same thread count), so that
    a test session's hundred-odd torchrun ranks skip the ~1.3 s CPU probe each."""
    wanted = f"{device.type}:{str(dtype).removeprefix('torch.')}"
    for item in os.environ.get(MATMUL_PEAK_ENV, "").split(","):
        name, _, rate = item.partition("=")
        if name == wanted:
            return float(rate), wanted.partition(":")[2]
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA; nothing queues on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size (CPU: the kernel's
    high-water mark, VmHWM, which `reset_peak_memory` resets; ru_maxrss where there is no /proc)
    of this rank since the process started or the last `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_gib` afresh from the memory in use now. On CPU the allocator's free
    heap is handed back first (glibc keeps it resident, all of it with a large
    MALLOC_TRIM_THRESHOLD_), so that the next peak is the next work's own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set (VmHWM) to now
        Path("/proc/self/clear_refs").write_text("5")


class ThroughputMeter:
    """The throughput columns of the training rows, over a window of optimizer steps: the work of
    the micro-batches this rank ran (`add`) and the window's time, evaluation and checkpoints
    left out (`paused`). `reduce` closes the window.

    `tokens_per_s`: real pair tokens (prompt twice, chosen, rejected: TRL's count, whatever the
    forward mode computes); `positions_per_s`: positions the model computed (padding included,
    a shared prompt once); `mfu`: `model_flops` of the window over the peak of every rank
    (`device_peak`, in the compute dtype); `peak_mem_gib`: `peak_memory_gib` of this rank."""

    def __init__(
        self, mode: str, causal_lm: torch.nn.Module, device: torch.device, dtype: torch.dtype, ranks: int
    ) -> None:
        self.mode, self.device, self.ranks = mode, device, ranks
        self.shape = model_shape(causal_lm)
        self.peak = device_peak(device, dtype, matmul_peak_once(device, dtype))
        self.start()

    def start(self) -> None:
        """Open a window now."""
        self.work, self.started = Work(), time.perf_counter()

    def add(self, lengths: Sequence[Sequence[int]]) -> None:
        """A micro-batch this rank ran: its pairs' (prompt, chosen, rejected) token counts."""
        self.work += forward_work(self.mode, lengths)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The time spent inside is not the window's (an evaluation, a checkpoint)."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused

    def reduce(self, window: PairMetrics) -> tuple[dict[str, float], dict[str, float]]:
        """Collective: (the global means of `window`'s pair metrics, the throughput columns of
        the window), in one all-reduce; the next window opens when it returns."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        totals = {
            "tokens": float(window.tokens),
            "positions": float(self.work.positions),
            "flops": model_flops(self.shape, self.work),
        }
        means = window.reduce(self.device, totals)
        tokens, positions, flops = (means.pop(k) for k in totals)
        means.pop("pairs")
        throughput = {
            "tokens_per_s": tokens / seconds,
            "positions_per_s": positions / seconds,
            "mfu": mfu(flops, seconds, self.peak.flops, self.ranks),
            "peak_mem_gib": peak_memory_gib(self.device),
        }
        self.start()
        return means, throughput


class MetricsLogger:
    """Rank 0 writes metrics.jsonl (flushed per line), a console line, and optionally wandb."""

    def __init__(
        self, run_dir: RunDir, cfg: LoggingConfig, is_main: bool, run_config: dict[str, Any]
    ) -> None:
        self.is_main = is_main
        self.file = open(run_dir.path / "metrics.jsonl", "a", encoding="utf-8") if is_main else None  # noqa: SIM115 (closed in close())
        self.wandb_run = None
        if is_main and cfg.wandb:
            self.wandb_run = _start_wandb(run_dir, cfg, run_config)

    def write(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        assert self.file is not None
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_row(row: dict[str, Any]) -> str:
    """One console line for a metrics row."""
    prefix = "eval/" if any(k.startswith("eval/") for k in row) else ""
    keys = ["loss", "rewards/accuracies", "rewards/margins", "lr", "grad_norm", "tokens_per_s", "mfu"]
    parts = [f"step {row['step']}"]
    for key in keys:
        value = row.get(prefix + key)
        if value is None:
            continue
        short = key.split("/")[-1]
        parts.append(f"{short} {value:.4g}" if isinstance(value, float) else f"{short} {value}")
    return (prefix.rstrip("/") + " " if prefix else "") + " | ".join(parts)


def wandb_mode(cfg: LoggingConfig) -> tuple[str, str]:
    """(wandb mode, the reason): `logging.mode` when set; under "auto" the WANDB_MODE
    environment variable when set, else online when an API key is configured."""
    if cfg.mode != "auto":
        return cfg.mode, f'logging.mode = "{cfg.mode}"'
    env = os.environ.get("WANDB_MODE", "")
    if env:
        return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
    if os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists():
        return "online", "an API key is configured"
    return "offline", "no API key found"


def _start_wandb(run_dir: RunDir, cfg: LoggingConfig, run_config: dict[str, Any]):
    import wandb

    output_dir = run_dir.path
    mode, why = wandb_mode(cfg)
    if mode == "offline":
        print(f"wandb: logging offline ({why}); sync later with `wandb sync`", file=sys.stderr)
    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    run_dir.record(id_file)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity or None,
        name=cfg.run_name or output_dir.name,
        tags=cfg.tags or None,
        mode=mode,
        dir=str(output_dir),
        id=run_id,
        resume="allow",
        config=run_config,
    )
