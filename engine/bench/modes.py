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
from engine.config import Config, ParallelConfig, Problems, check
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
from engine.sequence_parallel import TRAFFIC, data_parallel

RESULT_KEYS = (
    "tokens_per_s",
    "step_time_s",
    "step_time_min_s",
    "step_time_max_s",
    "padding_fraction",
    "pair_tokens_per_step",
    "computed_tokens_per_step",
    "peak_mem_gib",
    "peak_mem_above_start_gib",
    "comm_bytes_per_step",
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
    `parallel.compile = true`; `packed:sp2`: `parallel.sequence_parallel = 2`), so recompute,
    compile and sequence-parallel choices compare side by side in one run."""
    parallel = dataclasses.replace(cfg.parallel)
    for option in spec.split(":")[1:]:
        if option in RECOMPUTE:
            parallel.activation_checkpointing = option
        elif option == "compile":
            parallel.compile = True
        elif _sequence_option(option):
            parallel.sequence_parallel = _sequence_option(option)
        else:
            raise UserError(
                f"--modes: {spec!r}: unknown option {option!r} (known: {', '.join(RECOMPUTE)}, compile, "
                "spN with N >= 1)"
            )
    return parallel


def without_sequence_parallel(spec: str) -> str:
    """`spec` without its `:spN` option (`packed@4096:full:sp2` -> `packed@4096:full`): the mode
    whose unsplit rows a sequence-parallel mode compares with."""
    head, *options = spec.split(":")
    return ":".join([head, *(o for o in options if _sequence_option(o) is None)])


def _sequence_option(option: str) -> int | None:
    """N of a `:spN` mode option (0 for `sp0`, which `mode_parallel` rejects), else None."""
    return int(option[2:]) if option.startswith("sp") and option[2:].isdigit() else None


def mode_config(spec: str, cfg: Config) -> Config:
    """The recipe as mode `spec` runs it: its `[parallel]` table (`mode_parallel`), its forward
    mode and token budget (`parse_mode`) as `training.forward_mode` / `micro_batch_tokens`,
    checked by the recipe's own rules (`engine.config.check`, `engine.recipe.check_names`: e.g.
    sequence parallelism is not for `:compile`): a UserError naming the mode otherwise."""
    from engine.recipe import check_names

    layout, budget = parse_mode(spec, cfg)
    training = dataclasses.replace(cfg.training, forward_mode=layout, micro_batch_tokens=budget)
    out = dataclasses.replace(cfg, parallel=mode_parallel(spec, cfg), training=training)
    problems = Problems()
    check(out, problems)
    check_names(out, problems)
    if problems.found:
        raise UserError(*(f"--modes: {spec}: {message}" for _, message in problems.found))
    return out


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


def step_batches(
    setup: Setup, step: int, world: World, layout: str, budget: int, sequence_parallel: int = 1
) -> list[PairBatch]:
    """This rank's micro-batches of step `step` (`step_pair_ids`), cut as the trainer's sampler
    cuts a global batch (`rank_micro_batches`: each data-parallel rank its contiguous slice, in
    `micro_batch_size` pairs or by the token `budget`; the ranks of a sequence group of
    `sequence_parallel` share one: `engine.sequence_parallel.data_parallel`)."""
    t = setup.cfg.training
    tokens = FORWARD_MODES[layout].pair_positions(setup.lengths) if budget else None
    ids = step_pair_ids(setup, step)
    rank, ranks = data_parallel(world.rank, world.world_size, sequence_parallel)
    groups = rank_micro_batches(ids, rank, ranks, t.micro_batch_size, budget, tokens)
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
    """Build a fresh model for `mode` (`mode_config`), run the warm-up steps, then time the steps
    `timed`."""
    from engine.metrics import PairMetrics
    from engine.optim import build_optimizer, build_scheduler
    from engine.parallel import compile_stats, reset_compile_stats
    from engine.reference_cache import ReferenceLogps
    from engine.step import TrainStep, build_model

    cfg = mode_config(mode, setup.cfg)
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
    layout, budget = cfg.training.forward_mode, cfg.training.micro_batch_tokens  # `mode_config`'s
    train_step = TrainStep(model, optimizer, scheduler, cfg, device, setup.pad_id, reference, layout)
    sequence = train_step.sequence
    window = PairMetrics()  # the trainer's per-pair metrics, accumulated as it does (never read)

    def step(index: int) -> None:
        train_step(step_batches(setup, index, world, layout, budget, cfg.parallel.sequence_parallel), window)
        synchronize(device)

    model.train()
    for index in range(setup.warmup):
        step(index)
    gc.collect()
    reset_peak_memory(device)
    start = peak_memory_gib(device)  # what is held between steps (the peak starts here)
    if sequence is not None:
        sequence.take_sent()  # the timed steps' traffic only
    times = []
    for index in timed:
        if dist.is_initialized():
            dist.barrier()
        begin = time.perf_counter()
        step(index)
        times.append(time.perf_counter() - begin)
    memory = (peak_memory_gib(device), start)
    sent = sequence.take_sent() if sequence is not None else dict.fromkeys(TRAFFIC, 0)
    comm = {f"sequence_{kind}": count for kind, count in sent.items()}
    records = step_records(
        mode,
        setup,
        world,
        timed,
        times,
        memory,
        params,
        model_shape(causal_lm),
        comm,
        fsdp_bytes(model, cfg, world),
    )
    records["recompute"] = cfg.parallel.activation_checkpointing
    records["sequence_parallel"] = cfg.parallel.sequence_parallel
    if cfg.parallel.compile:  # compile time (in the warm-up steps), graph breaks, recompiles
        records["compile"] = compile_stats()
    return records


@dataclass(frozen=True)
class FsdpBytes:
    """What one rank sends in FSDP's collectives per event, counted from the sharded parameters
    (their unsharded sizes, FSDP's shard padding left out) as bus bytes: (n-1)/n of the tensor for
    an all-gather or reduce-scatter over n ranks, twice that for an all-reduce."""

    gather: int  # every unit's parameters in the compute dtype: once per forward
    regather: int  # the units resharded after forward (all but the output unit): again in backward
    reduce: int  # the trainable gradients in `parallel.reduce_dtype`: once per gradient sync
    replicas: int  # all-reduce of a reduced gradient shard across replicas (`hybrid`, `none`)
    per_step: bool  # gradient-sync deferral: one sync per step, not per micro-batch
    prepass: bool  # a batch-coupled loss: a no-grad forward of every micro-batch first

    def sent(self, forwards: int, micro_batches: int, steps: int) -> dict[str, int]:
        """Bytes sent over `steps` steps of `micro_batches` micro-batches and `forwards` forwards."""
        syncs = steps if self.per_step else micro_batches
        return {
            "fsdp_all_gather": forwards * ((2 if self.prepass else 1) * self.gather + self.regather),
            "fsdp_reduce_scatter": syncs * self.reduce,
            "fsdp_all_reduce": syncs * self.replicas,
        }


def fsdp_bytes(model: torch.nn.Module, cfg: Config, world: World) -> FsdpBytes:
    """`FsdpBytes` of `model` (`engine.step.build_model`'s) under `cfg.parallel`: its mesh
    (`engine.parallel.mesh_shape`), units (`edge_units`: the output unit stays gathered from
    forward to backward), resharding, dtypes and gradient-sync deferral, as `parallelize` sets them."""
    from engine.parallel import (
        compute_dtype,
        defers_gradient_sync,
        edge_units,
        mesh_shape,
        reduce_dtype,
        reshard_after_forward,
    )

    p = cfg.parallel
    shape, _ = mesh_shape(p, world.world_size, world.ranks_per_node)
    shard, replicas = shape[-1], world.world_size // shape[-1]
    kept = {id(x) for module in edge_units(model)[1] for x in module.parameters()}
    params = list(model.parameters())  # DTensors: numel() is the unsharded count
    gathered = compute_dtype(p, world.device).itemsize
    reduced = reduce_dtype(p).itemsize
    regathered = sum(x.numel() for x in params if id(x) not in kept) if reshard_after_forward(p) else 0
    trained = sum(x.numel() for x in params if x.requires_grad) * reduced
    return FsdpBytes(
        gather=sum(x.numel() for x in params) * gathered * (shard - 1) // shard,
        regather=regathered * gathered * (shard - 1) // shard,
        reduce=trained * (shard - 1) // shard,
        replicas=2 * trained // shard * (replicas - 1) // replicas,
        per_step=defers_gradient_sync(p),
        prepass=losses.batch_coupled(cfg.loss),
    )


def step_records(
    mode: str,
    setup: Setup,
    world: World,
    timed: range,
    times: list[float],
    memory: tuple[float, float],
    params: int,
    shape: ModelShape,
    comm: dict[str, int] | None = None,
    fsdp: FsdpBytes | None = None,
) -> dict[str, Any]:
    """Per timed step: time (max over ranks) and the work of `mode` on that step's pairs
    (summed over data-parallel ranks: a sequence group's ranks share its pairs and rows, counted
    once); per forward: the positions it computes (count, sum, sum of squares and max over all
    micro-batches); `memory` (peak, at the start of the timed steps) and the bytes sent (`comm`
    counted in the steps, and FSDP's from `fsdp`), max over ranks."""
    device = world.device
    cfg = mode_config(mode, setup.cfg)
    layout, budget, n = (
        cfg.training.forward_mode,
        cfg.training.micro_batch_tokens,
        cfg.parallel.sequence_parallel,
    )
    counts = world.rank % n == 0  # the sequence group's first rank counts its work
    per_step, forward_tokens, micro_batches = [], [], 0
    for step in timed:
        work = Work()
        batches = step_batches(setup, step, world, layout, budget, n)
        micro_batches += len(batches)
        for batch in batches:
            work += forward_work(layout, setup.lengths[batch.pair_ids.numpy()])
        pair_tokens = sum(batch.real_tokens for batch in batches)
        row = [pair_tokens, work.positions, work.real_positions, model_flops(shape, work)]
        per_step.append([x * counts for x in row])
        forward_tokens += work.forwards
    comm = {**(comm or {}), **(fsdp.sent(len(forward_tokens), micro_batches, len(timed)) if fsdp else {})}
    forward_tokens = forward_tokens if counts else []
    flat = reduce_over_ranks([x for row in per_step for x in row], device)
    columns = list(zip(*[flat[i : i + 4] for i in range(0, len(flat), 4)]))
    moments = reduce_over_ranks(
        [len(forward_tokens), sum(forward_tokens), sum(x * x for x in forward_tokens)], device
    )
    peak, start = memory
    most = reduce_over_ranks(
        [peak, peak - start, max(forward_tokens, default=0), *comm.values()], device, dist.ReduceOp.MAX
    )
    return {
        "forward_moments": moments,
        "forward_tokens_max": most[2],
        "params": params,
        "data_parallel": world.world_size // n,
        "step_times_s": reduce_over_ranks(times, device, dist.ReduceOp.MAX),
        "pair_tokens": list(columns[0]),
        "computed_tokens": list(columns[1]),
        "real_tokens": list(columns[2]),
        "model_flops": list(columns[3]),
        "peak_mem_gib": most[0],
        "peak_mem_above_start_gib": most[1],
        "comm_bytes": dict(zip(comm, (int(x) for x in most[3:]))),  # over the timed steps
    }


def merge_rounds(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two rounds' `step_records` of one mode as one."""
    merged = dict(a)
    for key in ("step_times_s", "pair_tokens", "computed_tokens", "real_tokens", "model_flops"):
        merged[key] = a[key] + b[key]
    for key in ("peak_mem_gib", "peak_mem_above_start_gib"):
        merged[key] = max(a[key], b[key])
    merged["comm_bytes"] = {k: v + b["comm_bytes"][k] for k, v in a["comm_bytes"].items()}
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
        "peak_mem_above_start_gib": raw["peak_mem_above_start_gib"],
        "comm_bytes_per_step": {k: v / steps for k, v in raw["comm_bytes"].items()},
        "mfu": statistics.median(
            mfu(f, t, peak_flops, world_size) for f, t in zip(raw["model_flops"], times)
        ),
        "model_flops_per_step": sum(raw["model_flops"]) / steps,
        "forwards_per_step": forwards / raw["data_parallel"] / steps,
        "micro_batch_tokens_mean": mean,
        "micro_batch_tokens_max": raw["forward_tokens_max"],
        "micro_batch_tokens_cv": math.sqrt(max(squares / forwards - mean * mean, 0.0)) / mean,
        **{key: raw[key] for key in ("recompute", "sequence_parallel", "compile") if key in raw},
    }


def paired_speedup(times: list[float], base_times: list[float]) -> float:
    """Median over timed steps of base time / time: step i of every mode reads the same pairs,
    and the modes' steps alternate in time, so each ratio compares like with like under the
    same background load."""
    return statistics.median(b / t for t, b in zip(times, base_times))
