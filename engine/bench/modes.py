"""The forward-mode bench: timed training steps of a forward mode on the recipe's model, and
what they computed (see engine/bench/__init__.py for what is reported).

Every rule of the step is the engine's: the model is built and sharded by
`engine.step.build_model`, a step is `engine.step.TrainStep`, its micro-batches are cut by the
sampler's `engine.data.sampler.rank_micro_batches`, its work is `engine.forward.forward_work`
counted by `engine.metrics.model_flops`, and peak memory is `engine.metrics.peak_memory_gib`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine import losses
from engine.bench.common import Pair, build_causal_lm, pair_batch, pair_lengths, reduce_over_ranks
from engine.config import Config, ParallelConfig
from engine.data import PairBatch
from engine.data.sampler import rank_micro_batches
from engine.distributed import World
from engine.errors import UserError
from engine.forward import FORWARD_MODES, Work, forward_work
from engine.metrics import (
    ModelShape,
    mfu,
    model_flops,
    model_shape,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
)

RESULT_KEYS = (
    "tokens_per_s",
    "step_time_s",
    "step_time_min_s",
    "step_time_max_s",
    "padding_fraction",
    "pair_tokens_per_step",
    "computed_tokens_per_step",
    "peak_mem_gib",
    "mfu",
    "model_flops_per_step",
    "forwards_per_step",
    "micro_batch_tokens_mean",
    "micro_batch_tokens_max",
    "micro_batch_tokens_cv",
)
RECOMPUTE = ("none", "full", "selective")


@dataclass
class Setup:
    """What every mode of one bench run shares."""

    cfg: Config
    pairs: list[Pair]
    pad_id: int
    steps: int  # timed steps per round
    warmup: int
    rounds: int
    model_overrides: dict[str, Any] = field(default_factory=dict)
    desirable: list[bool] | None = None  # unpaired examples' labels (`recipe_pairs`)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """[N, 3] token counts of `pairs` (`pair_lengths`)."""
        return pair_lengths(self.pairs)


# ----------------------------------------------------------------------------------------------
# Modes


def mode_parallel(spec: str, cfg: Config) -> ParallelConfig:
    """The `[parallel]` table a mode runs with: the recipe's, with the mode's `:OPTION`s applied
    (`packed:selective`, `concatenated:full`: `parallel.activation_checkpointing`; `:compile`:
    `parallel.compile = true`), so recompute and compile choices compare side by side in one run."""
    parallel = dataclasses.replace(cfg.parallel)
    for option in spec.split(":")[1:]:
        if option in RECOMPUTE:
            parallel.activation_checkpointing = option
        elif option == "compile":
            parallel.compile = True
        else:
            raise UserError(
                f"--modes: {spec!r}: unknown option {option!r} (known: {', '.join(RECOMPUTE)}, compile)"
            )
    return parallel


def parse_mode(spec: str, cfg: Config) -> tuple[str, int]:
    """`packed@4096` -> ("packed", 4096): a forward mode and its micro-batch token budget (0 =
    `micro_batch_size` pairs). Plain padding-free modes take the recipe's `micro_batch_tokens`;
    the mode's `:OPTION`s (`mode_parallel`) do not change the layout."""
    layout, at, budget = spec.split(":")[0].partition("@")
    if layout not in FORWARD_MODES:
        raise UserError(f"--modes: unknown forward mode {layout!r} (known: {', '.join(FORWARD_MODES)})")
    padding_free = FORWARD_MODES[layout].padding_free
    if not at:
        return layout, cfg.training.micro_batch_tokens if padding_free else 0
    if not padding_free or not budget.isdigit() or int(budget) < 1:
        raise UserError(
            f"--modes: {spec!r}: a token budget is `packed@N` or `prefix_shared@N` with N a positive integer"
        )
    return layout, int(budget)


def step_pair_ids(setup: Setup, step: int) -> list[int]:
    """The pairs of step `step`'s global batch: the next global_batch_size pairs, wrapping around."""
    size = setup.cfg.training.global_batch_size
    return [(step * size + i) % len(setup.pairs) for i in range(size)]


def step_batches(setup: Setup, step: int, world: World, layout: str, budget: int) -> list[PairBatch]:
    """This rank's micro-batches of step `step` (`step_pair_ids`), cut as the trainer's sampler
    cuts a global batch (`rank_micro_batches`: each rank its contiguous slice, in
    `micro_batch_size` pairs or by the token `budget`)."""
    t = setup.cfg.training
    tokens = FORWARD_MODES[layout].pair_positions(setup.lengths) if budget else None
    ids = step_pair_ids(setup, step)
    groups = rank_micro_batches(ids, world.rank, world.world_size, t.micro_batch_size, budget, tokens)
    labels = setup.desirable
    return [
        pair_batch(
            [setup.pairs[i] for i in group], group, None if labels is None else [labels[i] for i in group]
        )
        for group in groups
    ]


# ----------------------------------------------------------------------------------------------
# Runs


def run_mode(mode: str, setup: Setup, world: World, timed: range) -> dict[str, Any]:
    """Build a fresh model for `mode` (`parse_mode`), run the warm-up steps, then time the steps
    `timed`."""
    from engine.metrics import PairMetrics
    from engine.optim import build_optimizer, build_scheduler
    from engine.parallel import compile_stats, reset_compile_stats
    from engine.reference_cache import ReferenceLogps
    from engine.step import TrainStep, build_model

    cfg = dataclasses.replace(setup.cfg, parallel=mode_parallel(mode, setup.cfg))
    device = world.device
    causal_lm = build_causal_lm(cfg, setup.model_overrides) if setup.model_overrides else None
    if cfg.parallel.compile:
        reset_compile_stats()  # this mode's compilations only
    model, _ = build_model(cfg, world, causal_lm)
    causal_lm = model.causal_lm
    params = sum(p.numel() for p in causal_lm.parameters())
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, setup.warmup + setup.rounds * setup.steps, cfg.scheduler)
    reference = None
    if losses.needs_reference(cfg.loss):
        zeros = torch.zeros(len(setup.pairs), device=device)
        shared = (zeros, zeros) if losses.reference_needs_shared_length(cfg.loss) else ()
        reference = ReferenceLogps(zeros, zeros, *shared)
    layout, budget = parse_mode(mode, cfg)
    train_step = TrainStep(model, optimizer, scheduler, cfg, device, setup.pad_id, reference, layout)
    window = PairMetrics()  # the trainer's per-pair metrics, accumulated as it does (never read)

    def step(index: int) -> None:
        train_step(step_batches(setup, index, world, layout, budget), window)
        synchronize(device)

    model.train()
    for index in range(setup.warmup):
        step(index)
    gc.collect()
    reset_peak_memory(device)
    times = []
    for index in timed:
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - start)
    peak = peak_memory_gib(device)
    records = step_records(mode, setup, world, timed, times, peak, params, model_shape(causal_lm))
    records["recompute"] = cfg.parallel.activation_checkpointing
    if cfg.parallel.compile:  # compile time (in the warm-up steps), graph breaks, recompiles
        records["compile"] = compile_stats()
    return records


def step_records(
    mode: str,
    setup: Setup,
    world: World,
    timed: range,
    times: list[float],
    peak: float,
    params: int,
    shape: ModelShape,
) -> dict[str, Any]:
    """Per timed step: time (max over ranks) and the work of `mode` on that step's pairs
    (summed over ranks); per forward: the positions it computes (count, sum, sum of squares and
    max over all ranks' micro-batches)."""
    device = world.device
    layout, budget = parse_mode(mode, setup.cfg)
    per_step, forward_tokens = [], []
    for step in timed:
        work = Work()
        batches = step_batches(setup, step, world, layout, budget)
        for batch in batches:
            work += forward_work(layout, setup.lengths[batch.pair_ids.numpy()])
        pair_tokens = sum(batch.real_tokens for batch in batches)
        per_step.append([pair_tokens, work.positions, work.real_positions, model_flops(shape, work)])
        forward_tokens += work.forwards
    flat = reduce_over_ranks([x for row in per_step for x in row], device)
    columns = list(zip(*[flat[i : i + 4] for i in range(0, len(flat), 4)]))
    moments = reduce_over_ranks(
        [len(forward_tokens), sum(forward_tokens), sum(x * x for x in forward_tokens)], device
    )
    return {
        "forward_moments": moments,
        "forward_tokens_max": reduce_over_ranks([max(forward_tokens)], device, dist.ReduceOp.MAX)[0],
        "params": params,
        "step_times_s": reduce_over_ranks(times, device, dist.ReduceOp.MAX),
        "pair_tokens": list(columns[0]),
        "computed_tokens": list(columns[1]),
        "real_tokens": list(columns[2]),
        "model_flops": list(columns[3]),
        "peak_mem_gib": reduce_over_ranks([peak], device, dist.ReduceOp.MAX)[0],
    }


def merge_rounds(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two rounds' `step_records` of one mode as one."""
    merged = dict(a)
    for key in ("step_times_s", "pair_tokens", "computed_tokens", "real_tokens", "model_flops"):
        merged[key] = a[key] + b[key]
    merged["peak_mem_gib"] = max(a["peak_mem_gib"], b["peak_mem_gib"])
    merged["forward_moments"] = [x + y for x, y in zip(a["forward_moments"], b["forward_moments"])]
    merged["forward_tokens_max"] = max(a["forward_tokens_max"], b["forward_tokens_max"])
    if "compile" in b:  # each round builds and compiles afresh: the rounds' compilations add up
        merged["compile"] = {k: a["compile"][k] + v for k, v in b["compile"].items()}
    return merged


def summarize(raw: dict[str, Any], peak_flops: float, world_size: int) -> dict[str, Any]:
    """Medians over timed steps (robust to steps slowed by other work on a shared machine)."""
    times = raw["step_times_s"]
    computed = sum(raw["computed_tokens"])
    steps = len(times)
    forwards, total, squares = raw["forward_moments"]
    mean = total / forwards
    return {
        "tokens_per_s": statistics.median(n / t for n, t in zip(raw["pair_tokens"], times)),
        "step_time_s": statistics.median(times),
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "padding_fraction": Work(positions=computed, real_positions=sum(raw["real_tokens"])).padding_fraction,
        "pair_tokens_per_step": sum(raw["pair_tokens"]) / steps,
        "computed_tokens_per_step": computed / steps,
        "peak_mem_gib": raw["peak_mem_gib"],
        "mfu": statistics.median(
            mfu(f, t, peak_flops, world_size) for f, t in zip(raw["model_flops"], times)
        ),
        "model_flops_per_step": sum(raw["model_flops"]) / steps,
        "forwards_per_step": forwards / world_size / steps,
        "micro_batch_tokens_mean": mean,
        "micro_batch_tokens_max": raw["forward_tokens_max"],
        "micro_batch_tokens_cv": math.sqrt(max(squares / forwards - mean * mean, 0.0)) / mean,
        **{key: raw[key] for key in ("recompute", "compile") if key in raw},
    }


def paired_speedup(times: list[float], base_times: list[float]) -> float:
    """Median over timed steps of base time / time: step i of every mode reads the same pairs,
    and the modes' steps alternate in time, so each ratio compares like with like under the
    same background load."""
    return statistics.median(b / t for t, b in zip(times, base_times))
