"""Forward-mode benchmark: timed training steps of each forward mode on the recipe's model.

    python -m engine.bench RECIPE.toml [table.key=value ...] \\
        --modes concatenated,separate,packed,prefix_shared,packed@4096 [--steps 5] [--warmup 1] [--rounds 1] \\
        [--synthetic-pairs N] [--prompt-len 150] [--completion-len 50,500] \\
        [--model-config hidden_size=384,num_hidden_layers=6] [--out bench.json] [--against trl]
    torchrun --nproc_per_node 2 -m engine.bench RECIPE.toml ...
    python -m engine.bench --logprob-memory [--vocab 32000 --hidden 256 --rows 8 --seq-len 1024]
    python -m engine.bench --gpu-check OUT_DIR [--gpu-check-size auto|tiny|full] [--gpu-check-phases a,b]

A mode is a forward mode, optionally with `:OPTION`s (`packed:selective`, `concatenated:full`:
that activation checkpointing; `packed:compile`: `parallel.compile`, reporting compile time,
graphs, graph breaks and recompiles), and a token budget for its micro-batches (`packed@4096`:
`training.micro_batch_tokens = 4096`; plain packed modes take the recipe's
`training.micro_batch_tokens`, padded ones its `micro_batch_size`), so a fixed pair count and a
token budget can be compared in one run. Each mode gets a freshly built (same seed) model, built
and sharded by the recipe's `[parallel]` table as the trainer builds it
(`engine.step.build_model`), and its optimizer and scheduler; `--warmup` steps, then `--steps`
timed steps of the trainer's own step (`engine.step.TrainStep`: forward and backward of each
micro-batch, gradient-sync deferral, the non-finite check, clipping, optimizer and scheduler)
over the recipe's global batch (micro-batches and accumulation as in training),
with `--rounds` repeating the whole sequence of modes (alternating them, so that load drift
on a shared machine hits every mode alike; step times are pooled), on the same pairs for every
mode: the recipe's training data in order, or synthetic pairs
(prompt lengths log-normal around `--prompt-len`, completion lengths uniform in
`--completion-len`; the default is UltraFeedback-like). Reference log-probs are a table of zeros
on the device, looked up by pair as the trainer looks up its cached ones, so the step is the
policy's work only (its loss values mean nothing).

Per mode it reports:
- `tokens_per_s`: real pair tokens (prompt twice, chosen, rejected: what an unshared,
  padding-free layout reads; the trainer's unit) per second, all ranks, the median over the
  timed steps (medians, not means, so that a step slowed by other work on a shared machine
  does not decide the result);
- `step_time_s` (median), `step_time_min_s`, `step_time_max_s`;
- `padding_fraction`: share of the positions run through the model that are padding;
- `computed_tokens_per_step`: positions run through the model (prefix sharing computes fewer
  than the pair tokens);
- `forwards_per_step` (mean, per rank; a micro-batch is one forward, two in `separate`),
  `micro_batch_tokens_mean`, `micro_batch_tokens_max` and `micro_batch_tokens_cv` (std / mean):
  positions computed per forward, over all ranks' timed forwards (how steady the work of a
  forward is);
- `peak_mem_gib`: peak CUDA memory allocated, or on CPU the peak resident set size of the timed
  steps (the kernel's high-water mark, reset per mode after the allocator's free memory is
  trimmed, so earlier modes do not count), max over ranks;
- `mfu`: model FLOPs / step time / (peak FLOP/s x ranks), median over steps, and
  `model_flops_per_step`: the trainer's count (`engine.metrics.model_flops`: linear layers over
  the positions computed, attention over the (query, key) pairs attended, the LM head over the
  scored positions, no recompute). The peak (`engine.metrics.device_peak`; `setup.peak_flops`,
  `setup.peak_source`): on a known CUDA device its dense peak in the compute dtype, else the
  matmul rate measured on this device in this run (`setup.matmul_flops`, reported either way):
  a 2048^3 matmul by default, timed before every round and at the end, the best of those (so
  that one measurement taken under other load does not inflate the MFU), in the compute dtype,
  on CPU the faster of it and fp32 (`engine.metrics.matmul_peak`; `setup.matmul_dtype` says
  which).

`ratios` are paired: the median over timed steps of one mode's speed-up over another on the
same pairs (robust on a shared machine, where a mode's median alone moves with the load).

`--against trl` runs TRL's `DPOTrainer` (when installed: `pip install trl`) on the same model
weights, pairs (pre-tokenized, in the same order), batch and accumulation, configured at its
fastest on this device (precomputed reference, no gradient checkpointing, fp32/bf16 as fsdpo),
and reports the same numbers and the ratio. Results depend on the allocator on CPU (see
FINDINGS): the JSON records the MALLOC_* environment the run had.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine import losses
from engine.config import Config, ParallelConfig, load_config
from engine.data import PairBatch, pair_token_counts, token_budget_micro_batches
from engine.data.sampler import split_global_batch
from engine.errors import UserError
from engine.forward import FORWARD_MODES, score_tokens
from engine.metrics import ModelShape, Work, forward_work, mfu, model_flops, model_shape

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

Pair = tuple[list[int], list[int], list[int]]


# ----------------------------------------------------------------------------------------------
# Pairs


def synthetic_pairs(
    count: int, prompt_len: int, completion_len: tuple[int, int], vocab: int, max_length: int, seed: int
) -> list[Pair]:
    """Random-token pairs: prompt lengths log-normal with mean `prompt_len` (sigma 0.6, as
    chat prompts are skewed), chosen and rejected lengths uniform in `completion_len`, each
    completion cut to fit `max_length` (keep-start truncation, at least one token)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.6
    mu = math.log(max(prompt_len, 1)) - sigma**2 / 2
    lo, hi = completion_len
    pairs = []
    for _ in range(count):
        p = int(torch.empty(1).log_normal_(mu, sigma, generator=g).round().clamp(4, max_length - 1).item())
        c, r = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(2))
        c, r = max(1, min(c, max_length - p)), max(1, min(r, max_length - p))
        tokens = torch.randint(3, vocab, (p + c + r,), generator=g).tolist()
        pairs.append((tokens[:p], tokens[p : p + c], tokens[p + c :]))
    return pairs


def recipe_pairs(cfg: Config, tokenizer) -> list[Pair]:
    from engine.data import build_dataset

    data = build_dataset(cfg.data.train, tokenizer, cfg.data, cfg.job.seed)
    pairs = (data.pairs[i] for i in range(len(data)))
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]


def pair_batch(pairs: list[Pair], ids: list[int]) -> PairBatch:
    """A micro-batch of `pairs`, whose indices in the bench's pair list are `ids`."""
    return PairBatch(
        pair_ids=torch.tensor(ids, dtype=torch.long),
        valid=torch.ones(len(pairs), dtype=torch.bool),
        prompts=[p for p, _, _ in pairs],
        chosen=[c for _, c, _ in pairs],
        rejected=[r for _, _, r in pairs],
    )


RECOMPUTE = ("none", "full", "selective")


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
    `micro_batch_size` pairs). Plain packed modes take the recipe's `micro_batch_tokens`; the
    mode's `:OPTION`s (`mode_parallel`) do not change the layout."""
    layout, at, budget = spec.split(":")[0].partition("@")
    if layout not in FORWARD_MODES:
        raise UserError(f"--modes: unknown forward mode {layout!r} (known: {', '.join(FORWARD_MODES)})")
    packed = layout in ("packed", "prefix_shared")
    if not at:
        return layout, cfg.training.micro_batch_tokens if packed else 0
    if not packed or not budget.isdigit() or int(budget) < 1:
        raise UserError(
            f"--modes: {spec!r}: a token budget is `packed@N` or `prefix_shared@N` with N a positive integer"
        )
    return layout, int(budget)


def _pair_tokens(pairs: list[Pair], layout: str):
    """Positions each pair takes in the packed `layout` (`pair_token_counts`)."""
    return pair_token_counts([[len(x) for x in pair] for pair in pairs], layout)


def step_batches(
    pairs: list[Pair], step: int, cfg: Config, rank: int, world: int, layout: str = "", budget: int = 0
) -> list[PairBatch]:
    """This rank's micro-batches of step `step`: the step's global batch is the next
    global_batch_size pairs (wrapping around), each rank its contiguous slice, cut into
    `micro_batch_size` pairs, or by a token `budget` as the trainer's sampler does."""
    t = cfg.training
    per_rank = t.global_batch_size // world
    first = step * t.global_batch_size
    step_pairs = [pairs[(first + i) % len(pairs)] for i in range(t.global_batch_size)]
    start = first + rank * per_rank
    mine = step_pairs[rank * per_rank : (rank + 1) * per_rank]
    ids = [(start + i) % len(pairs) for i in range(per_rank)]
    if budget:
        tokens = _pair_tokens(step_pairs, layout).tolist()
        slices = [tokens[r * per_rank : (r + 1) * per_rank] for r in range(world)]
        groups = token_budget_micro_batches(slices, rank, budget)
    else:
        m = t.micro_batch_size
        groups = [list(range(i, min(i + m, per_rank))) for i in range(0, per_rank, m)]
    return [pair_batch([mine[i] for i in group], [ids[i] for i in group]) for group in groups]


# ----------------------------------------------------------------------------------------------
# Work accounting


def step_work(mode: str, batches: list[PairBatch]) -> tuple[int, Work]:
    """(real pair tokens, `engine.metrics.forward_work`) of some micro-batches of `mode`."""
    work = Work()
    for batch in batches:
        work += forward_work(
            mode, [(len(p), len(c), len(r)) for p, c, r in zip(batch.prompts, batch.chosen, batch.rejected)]
        )
    return sum(batch.real_tokens for batch in batches), work


# ----------------------------------------------------------------------------------------------
# Memory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # hand the allocator's free memory back first (glibc keeps freed heap resident, and keeps
    # all of it with a large MALLOC_TRIM_THRESHOLD_), so the peak is this mode's own
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set (VmHWM) to now
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 2**20
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# fsdpo steps


@dataclass
class Setup:
    cfg: Config
    pairs: list[Pair]
    pad_id: int
    steps: int  # timed steps per round
    warmup: int
    rounds: int
    model_overrides: dict[str, Any] = field(default_factory=dict)


def build_causal_lm(cfg: Config, overrides: dict[str, Any]) -> torch.nn.Module:
    """The recipe's model (`engine.model.build_policy`), or a random-init model of its config
    with `overrides` applied (e.g. a bench-sized Llama from the demo config)."""
    from engine.model import apply_lora, build_policy

    if not overrides:
        return build_policy(cfg.model, cfg.lora, cfg.job.seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"--model-config: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    torch.manual_seed(cfg.job.seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
    )
    model.config.use_cache = False
    return apply_lora(model, cfg.lora, cfg.job.seed) if cfg.lora.enabled else model


def run_mode(mode: str, setup: Setup, world, timed: range) -> dict[str, Any]:
    """Build a fresh model for `mode` (`parse_mode`), run the warm-up steps, then time the steps
    `timed`."""
    from engine.metrics import PairMetrics
    from engine.optim import build_optimizer, build_scheduler
    from engine.parallel import compile_stats, reset_compile_stats
    from engine.reference import ReferenceLogps
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
        reference = ReferenceLogps(zeros, zeros)
    layout, budget = parse_mode(mode, cfg)
    train_step = TrainStep(model, optimizer, scheduler, cfg, device, setup.pad_id, reference, layout)
    window = PairMetrics()  # the trainer's per-pair metrics, accumulated as it does (never read)

    def step(index: int) -> None:
        train_step(
            step_batches(setup.pairs, index, cfg, world.rank, world.world_size, layout, budget), window
        )
        _sync(device)

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
    world,
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
        batches = step_batches(setup.pairs, step, setup.cfg, world.rank, world.world_size, layout, budget)
        pair_tokens, work = step_work(layout, batches)
        per_step.append([pair_tokens, work.positions, work.real_positions, model_flops(shape, work)])
        forward_tokens += work.forwards
    flat = _reduce([x for row in per_step for x in row], device)
    columns = list(zip(*[flat[i : i + 4] for i in range(0, len(flat), 4)]))
    moments = _reduce([len(forward_tokens), sum(forward_tokens), sum(x * x for x in forward_tokens)], device)
    return {
        "forward_moments": moments,
        "forward_tokens_max": _reduce([max(forward_tokens)], device, dist.ReduceOp.MAX)[0],
        "params": params,
        "step_times_s": _reduce(times, device, dist.ReduceOp.MAX),
        "pair_tokens": list(columns[0]),
        "computed_tokens": list(columns[1]),
        "real_tokens": list(columns[2]),
        "model_flops": list(columns[3]),
        "peak_mem_gib": _reduce([peak], device, dist.ReduceOp.MAX)[0],
    }


def _reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) of each value over ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def paired_speedup(times: list[float], base_times: list[float]) -> float:
    """Median over timed steps of base time / time: step i of every mode reads the same pairs,
    and the modes' steps alternate in time, so each ratio compares like with like under the
    same background load."""
    return statistics.median(b / t for t, b in zip(times, base_times))


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
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
        "padding_fraction": 1 - sum(raw["real_tokens"]) / computed if computed else 0.0,
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


# ----------------------------------------------------------------------------------------------
# TRL


def import_trl():
    """The trl module, or a UserError saying how to install it."""
    try:
        import trl
    except ImportError:
        raise UserError("--against trl: TRL is not installed (pip install trl)") from None
    return trl


def run_trl(setup: Setup, world, tokenizer, timed: range) -> dict[str, Any]:
    """TRL's DPOTrainer on the same weights, pairs (same order), batch and accumulation: the
    warm-up steps, then the steps `timed`."""
    from datasets import Dataset
    from transformers import TrainerCallback

    trl = import_trl()
    cfg, device = setup.cfg, world.device
    t = cfg.training
    accumulation = t.global_batch_size // t.micro_batch_size
    step_indices = [*range(setup.warmup), *timed]
    total_steps = len(step_indices)
    gbs = t.global_batch_size
    order = [setup.pairs[(s * gbs + i) % len(setup.pairs)] for s in step_indices for i in range(gbs)]
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [p for p, _, _ in order],
            "chosen_ids": [c for _, c, _ in order],
            "rejected_ids": [r for _, _, r in order],
        }
    )

    class PretokenizedDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # already token ids, as fsdpo's
            return dataset

    class StepTimer(TrainerCallback):
        """Step times as intervals between step ends (data loading and collation included, as
        in fsdpo's steps); the first step is timed from its beginning."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == setup.warmup:
                gc.collect()
                reset_peak_memory(device)
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.marks.append(time.perf_counter())

    bf16 = cfg.parallel.mixed_precision == "bf16" or (
        cfg.parallel.mixed_precision == "auto" and device.type == "cuda"
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out,
            per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=total_steps,
            learning_rate=cfg.optimizer.lr,
            weight_decay=cfg.optimizer.weight_decay,
            max_grad_norm=cfg.optimizer.max_grad_norm,
            lr_scheduler_type="constant",
            beta=cfg.loss.beta,
            max_length=cfg.data.max_length,
            precompute_ref_log_probs=True,
            gradient_checkpointing=False,
            bf16=bf16,
            use_cpu=device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_steps=max(total_steps, 1),
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            seed=cfg.job.seed,
            disable_tqdm=True,
        )
        model = build_causal_lm(cfg, setup.model_overrides)
        trainer = PretokenizedDPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
        trainer.train()
        peak = peak_memory_gib(device)
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])][setup.warmup :]
    params = sum(p.numel() for p in model.parameters())
    # TRL's layout is concatenated's: 2B right-padded rows. Counted as fsdpo's (the LM head over
    # the scored positions), though TRL runs its head over every position: the same useful work
    records = step_records("concatenated", setup, world, timed, times, peak, params, model_shape(model))
    return {**records, "trl_version": trl.__version__}


# ----------------------------------------------------------------------------------------------
# Log-prob step memory (one process per variant: the peak resident set is per process)


def logprob_step(variant: str, vocab: int, hidden: int, rows: int, seq_len: int, chunk_tokens: int) -> dict:
    """Forward + backward of the log-prob step alone over rows x seq_len scored positions."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(rows * seq_len, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (rows * seq_len,))
    gc.collect()
    base = _current_rss_gib()
    reset_peak_memory(torch.device("cpu"))
    start = time.perf_counter()
    if variant == "full_logits":  # the usual path: [rows, T, V] fp32 logits, log_softmax, gather
        logits = head(states.view(rows, seq_len, hidden)).float()
        logp = torch.log_softmax(logits, -1).gather(-1, targets.view(rows, seq_len, 1)).squeeze(-1)
    else:
        logp, _ = score_tokens(head, states, targets, 0 if variant == "unchunked" else chunk_tokens)
    logp.sum().backward()
    elapsed = time.perf_counter() - start
    peak = peak_memory_gib(torch.device("cpu"))
    return {"variant": variant, "peak_delta_gib": peak - base, "seconds": elapsed}


def _current_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 2**20


def logprob_memory(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for variant in ("full_logits", "unchunked", "chunked"):
        cmd = [
            sys.executable, "-m", "engine.bench", "--logprob-memory-variant", variant,
            "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--rows", str(args.rows),
            "--seq-len", str(args.seq_len), "--chunk-tokens", str(args.chunk_tokens),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_gib = args.rows * args.seq_len * args.vocab * 4 / 2**30
    print(
        f"log-prob step, {args.rows} x {args.seq_len} positions, vocab {args.vocab}, hidden {args.hidden} "
        f"(fp32 logits of all positions: {logits_gib:.2f} GiB); chunk {args.chunk_tokens} positions"
    )
    for variant, r in results.items():
        ratio = r["peak_delta_gib"] / results["unchunked"]["peak_delta_gib"]
        print(
            f"  {variant:12s} peak +{r['peak_delta_gib']:.3f} GiB ({ratio:.2f}x unchunked), {r['seconds']:.2f} s"
        )
    return {"setup": vars(args), "logits_gib": logits_gib, "results": results}


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="?", help="recipe TOML")
    parser.add_argument("overrides", nargs="*", help="table.key=value recipe overrides")
    parser.add_argument("--modes", default=",".join(FORWARD_MODES), help="comma-separated forward modes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each mode's timed steps")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all modes this many times, alternating")
    parser.add_argument(
        "--synthetic-pairs", type=int, default=0, help="use N synthetic pairs (0 = recipe data)"
    )
    parser.add_argument("--prompt-len", type=int, default=150, help="synthetic mean prompt tokens")
    parser.add_argument("--completion-len", default="50,500", help="synthetic completion tokens MIN,MAX")
    parser.add_argument("--model-config", default="", help="model config overrides k=v,k=v (random init)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the matmul timed for the peak")
    parser.add_argument("--out", default="", help="write results as JSON here")
    parser.add_argument("--against", default="", choices=["", "trl"], help="also run a peer trainer")
    parser.add_argument("--logprob-memory", action="store_true", help="measure the log-prob step's memory")
    parser.add_argument("--logprob-memory-variant", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--gpu-check", default="", metavar="OUT_DIR", help="run the GPU check (engine/gpu_check.py)"
    )
    parser.add_argument(
        "--gpu-check-size", default="auto", choices=["auto", "tiny", "full"], help="auto: full on CUDA"
    )
    parser.add_argument("--gpu-check-phases", default="", help="comma-separated phases (default: all)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    return parser.parse_intermixed_args(argv)


def _parse_model_config(text: str) -> dict[str, Any]:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'mode':19s} {'tokens/s':>9s} {'step s (min-max)':>20s} {'padding':>8s} {'computed/step':>13s} "
        f"{'fwd/step':>8s} {'tokens/fwd mean, max, cv':>24s} {'peak GiB':>9s} {'MFU':>6s}"
    )
    lines = [head, "-" * len(head)]
    for mode, r in results.items():
        spread = f"{r['step_time_s']:.3f} ({r['step_time_min_s']:.2f}-{r['step_time_max_s']:.2f})"
        per_forward = f"{r['micro_batch_tokens_mean']:.0f}, {r['micro_batch_tokens_max']:.0f}, {r['micro_batch_tokens_cv']:.2f}"
        lines.append(
            f"{mode:19s} {r['tokens_per_s']:9.0f} {spread:>20s} {r['padding_fraction']:8.1%} "
            f"{r['computed_tokens_per_step']:13.0f} {r['forwards_per_step']:8.1f} {per_forward:>24s} "
            f"{r['peak_mem_gib']:9.2f} {r['mfu']:6.1%}"
        )
        if "compile" in r:
            c = r["compile"]
            lines.append(
                f"{'':19s} compile {c['compile_s']:.1f} s, {c['graphs']} graphs, "
                f"{c['graph_breaks']} graph breaks, {c['recompiles']} recompiles"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.logprob_memory_variant:
        print(json.dumps(logprob_step(args.logprob_memory_variant, args.vocab, args.hidden, args.rows,
                                      args.seq_len, args.chunk_tokens)))  # fmt: skip
        return {}
    if args.gpu_check:
        from engine.gpu_check import run_gpu_check

        return run_gpu_check(args.gpu_check, args.gpu_check_size, args.gpu_check_phases)
    if args.logprob_memory:
        result = logprob_memory(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    if not args.recipe:
        raise UserError("usage: python -m engine.bench RECIPE.toml [overrides] [--modes ...]")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from engine.distributed import init_distributed, log
    from engine.metrics import device_peak, format_rate, matmul_peak
    from engine.model import build_tokenizer
    from engine.parallel import compute_dtype

    if args.against == "trl":  # before any fsdpo mode runs
        import_trl()
    cfg = load_config(args.recipe, args.overrides)
    world = init_distributed()
    if args.against == "trl" and world.world_size > 1:
        raise UserError("--against trl: run it in one process (without torchrun)")
    t = cfg.training
    layouts = {m: parse_mode(m, cfg) for m in modes}
    split_global_batch(t.global_batch_size, t.micro_batch_size, world.world_size)
    tokenizer = build_tokenizer(cfg.model)
    overrides = _parse_model_config(args.model_config)
    if args.synthetic_pairs:
        lo, hi = (int(x) for x in args.completion_len.split(","))
        vocab = overrides.get("vocab_size") or len(tokenizer)
        pairs = synthetic_pairs(
            args.synthetic_pairs, args.prompt_len, (lo, hi), vocab, cfg.data.max_length, cfg.job.seed
        )
    else:
        pairs = recipe_pairs(cfg, tokenizer)
    for m, (layout, budget) in layouts.items():
        longest = max(_pair_tokens(pairs, layout)) if budget else 0
        if longest > budget:
            raise UserError(
                f"--modes: {m}: the token budget {budget} is smaller than a pair of {longest} tokens"
            )
    setup = Setup(cfg, pairs, tokenizer.pad_token_id, args.steps, args.warmup, args.rounds, overrides)
    dtype = compute_dtype(cfg.parallel, world.device)

    raw: dict[str, dict[str, Any]] = {}
    runners = [*modes, *(["trl"] if args.against == "trl" else [])]
    peaks = []  # (FLOP/s, the dtype measured): `matmul_peak`
    for round_index in range(args.rounds):  # modes alternate, so load drift hits them alike
        peaks.append(matmul_peak(world.device, dtype, args.matmul_size))
        timed = range(args.warmup + round_index * args.steps, args.warmup + (round_index + 1) * args.steps)
        for name in runners:
            log(
                f"bench: round {round_index + 1}/{args.rounds}: {name} ({args.warmup} warm-up + {args.steps} timed steps)"
            )
            if name == "trl":
                result = run_trl(setup, world, tokenizer, timed)
            else:
                result = run_mode(name, setup, world, timed)
            raw[name] = result if name not in raw else _merge(raw[name], result)
    peaks.append(matmul_peak(world.device, dtype, args.matmul_size))
    rates = _reduce([rate for rate, _ in peaks], world.device, dist.ReduceOp.MIN)  # the slowest rank's
    peak = device_peak(world.device, dtype, (max(rates), max(peaks)[1]))

    results = {name: summarize(r, peak.flops, world.world_size) for name, r in raw.items()}
    for name, r in raw.items():
        results[name]["step_times_s"] = r["step_times_s"]
    comparisons = [(m, "concatenated") for m in modes if m != "concatenated"]
    comparisons += [("prefix_shared", "packed")] + [(m, "trl") for m in modes]
    comparisons += [(m, layouts[m][0]) for m in modes if "@" in m]  # token budget vs fixed pairs
    ratios = {
        f"{a}/{b}": paired_speedup(raw[a]["step_times_s"], raw[b]["step_times_s"])
        for a, b in comparisons
        if a in raw and b in raw
    }
    prompt_tokens = sum(len(p) for p, _, _ in pairs)
    unique_tokens = sum(len(p) + len(c) + len(r) for p, c, r in pairs)
    report = {
        "setup": {
            "recipe": str(args.recipe),
            "overrides": args.overrides,
            "model_config": overrides,
            "params": raw[modes[0]]["params"] if modes else raw.get("trl", {}).get("params"),
            "device": str(world.device),
            "world_size": world.world_size,
            "dtype": str(dtype),
            "global_batch_size": t.global_batch_size,
            "micro_batch_size": t.micro_batch_size,
            "micro_batch_tokens": {m: budget for m, (_, budget) in layouts.items() if budget},
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "pairs": "synthetic" if args.synthetic_pairs else "recipe",
            "mean_pair_tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs) / len(pairs),
            "prompt_share": prompt_tokens / unique_tokens,
            "matmul_flops": peak.measured,
            "matmul_dtype": max(peaks)[1],
            "peak_flops": peak.flops,
            "peak_source": peak.why,
            "torch_threads": torch.get_num_threads(),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "modes": results,
        "ratios": ratios,
    }
    if world.is_main:
        s = report["setup"]
        print(
            f"\n{s['params'] / 1e6:.1f}M params, {world.world_size} rank(s) on {world.device}, {dtype}, "
            f"batch {t.global_batch_size} pairs (micro {t.micro_batch_size}), {s['mean_pair_tokens']:.0f} "
            f"pair tokens/pair, prompt share {s['prompt_share']:.0%}, MFU peak {format_rate(peak.flops)} ({peak.why}), "
            f"malloc env {s['malloc_env'] or 'default'}"
        )
        print(format_table(results))
        print("  ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _entry() -> None:
    from engine.distributed import exit_process

    code = 0
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_process(code)


if __name__ == "__main__":
    _entry()
