"""Metric reduction across ranks, throughput and MFU, and the sinks (console, JSONL, wandb).

Per-pair values are summed locally over the micro-batches of the logging window and reduced with
one all-reduce of a single vector per log step; means are taken over the global pair count, so
the numbers do not depend on how a batch was split across ranks and micro-batches.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import LoggingConfig
from engine.losses import LossOutput, PreferenceLogps
from engine.run_dir import RunDir

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PairMetrics:
    """Sums of per-pair metrics over valid pairs, reduced across ranks on demand."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0.0
        self.tokens = 0  # real (non-pad) tokens read, for throughput

    def add(self, losses: torch.Tensor, out: LossOutput, logps: PreferenceLogps, valid: torch.Tensor) -> None:
        v = valid.to(losses.device, torch.float64)
        values = {
            "loss": losses.detach(),
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).to(torch.float64),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "logps/chosen": logps.chosen_logps.detach(),
            "logps/rejected": logps.rejected_logps.detach(),
            **out.extras,
        }
        for name, value in values.items():
            total = (value.detach().to(torch.float64) * v).sum().item()
            self.sums[name] = self.sums.get(name, 0.0) + total
        self.pairs += v.sum().item()

    def reduce(self, device: torch.device, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Global means of every metric, plus `extra` values summed across ranks (one all-reduce)."""
        names = sorted(self.sums)
        extra = extra or {}
        vector = torch.tensor(
            [self.sums[n] for n in names] + [self.pairs] + list(extra.values()),
            dtype=torch.float64,
            device=device,
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vector)
        values = vector.tolist()
        pairs = values[len(names)]
        means = {n: values[i] / max(pairs, 1.0) for i, n in enumerate(names)}
        summed = dict(zip(extra, values[len(names) + 1 :]))
        return {**means, **summed, "pairs": pairs}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """Achieved FLOP/s of a large square matmul on this device: the MFU denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    repeats, start = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < 0.3:
        a @ b
        repeats += 1
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048) -> tuple[float, str]:
    """The MFU denominator and the dtype it was measured in: the matmul rate of the compute
    dtype; on CPU the faster of it and fp32. A CPU without bf16 units can run a bf16 matmul far
    below its fp32 rate, and a bf16 peak there gave MFUs above 100%: the faster of the two bounds
    what the CPU's matmuls reach."""
    rate, name = measure_matmul_flops(device, dtype, size), str(dtype).removeprefix("torch.")
    if device.type == "cpu" and dtype != torch.float32:
        fp32 = measure_matmul_flops(device, torch.float32, size)
        if fp32 > rate:
            return fp32, f"float32, faster than {name} on this CPU"
    return rate, name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size (CPU) of this rank."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20


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
