"""The bench's command line (`python -m engine.bench`, `torchrun ... -m engine.bench`): the
forward-mode bench's rounds and report, or one of the other tools (`--logprob-memory`,
`--gpu-check`). See engine/bench/__init__.py."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine import losses
from engine.bench.common import recipe_pairs, reduce_over_ranks, synthetic_pairs
from engine.bench.modes import (
    Setup,
    merge_rounds,
    mode_config,
    paired_speedup,
    parse_mode,
    run_mode,
    summarize,
    without_sequence_parallel,
)
from engine.bench.trl import import_trl, run_trl
from engine.data.sampler import BatchPlan
from engine.errors import UserError
from engine.forward import FORWARD_MODES
from engine.recipe import load_config
from engine.sequence_parallel import data_parallel


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.bench",
        description="Forward-mode benchmark: timed training steps of each forward mode on the recipe's model.",
    )
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
    parser.add_argument(
        "--gpu-check", default="", metavar="OUT_DIR", help="run the GPU check (engine/bench/gpu_check.py)"
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
    w = max([19, *map(len, results)])  # the mode column
    head = (
        f"{'mode':{w}s} {'tokens/s':>9s} {'step s (min-max)':>20s} {'padding':>8s} {'computed/step':>13s} "
        f"{'fwd/step':>8s} {'tokens/fwd mean, max, cv':>24s} {'peak GiB':>9s} {'step GiB':>8s} "
        f"{'comm MiB':>9s} {'MFU':>6s}"
    )
    lines = [head, "-" * len(head)]
    for mode, r in results.items():
        spread = f"{r['step_time_s']:.3f} ({r['step_time_min_s']:.2f}-{r['step_time_max_s']:.2f})"
        per_forward = f"{r['micro_batch_tokens_mean']:.0f}, {r['micro_batch_tokens_max']:.0f}, {r['micro_batch_tokens_cv']:.2f}"
        lines.append(
            f"{mode:{w}s} {r['tokens_per_s']:9.0f} {spread:>20s} {r['padding_fraction']:8.1%} "
            f"{r['computed_tokens_per_step']:13.0f} {r['forwards_per_step']:8.1f} {per_forward:>24s} "
            f"{r['peak_mem_gib']:9.2f} {r['peak_mem_above_start_gib']:8.2f} "
            f"{sum(r['comm_bytes_per_step'].values()) / 2**20:9.1f} {r['mfu']:6.1%}"
        )
        comm = {k: v for k, v in r["comm_bytes_per_step"].items() if v}
        if len(comm) > 1:  # where the traffic goes, when more than one kind
            lines.append(
                f"{'':{w}s} comm MiB/step: " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in comm.items())
            )
        if "compile" in r:
            c = r["compile"]
            lines.append(
                f"{'':{w}s} compile {c['compile_s']:.1f} s, {c['graphs']} graphs, "
                f"{c['graph_breaks']} graph breaks, {c['recompiles']} recompiles"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the tool the arguments name; returns its report."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.gpu_check:
        from engine.bench.gpu_check import run_gpu_check

        return run_gpu_check(args.gpu_check, args.gpu_check_size, args.gpu_check_phases)
    if args.logprob_memory:
        from engine.bench.logprob_memory import logprob_memory

        result = logprob_memory(vars(args))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return result
    if not args.recipe:
        raise UserError("usage: python -m engine.bench RECIPE.toml [overrides] [--modes ...]")
    return run_bench(args)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The forward-mode bench: `--rounds` rounds of every mode (and the peer), then the report."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from engine.distributed import init_distributed, log
    from engine.metrics import device_peak, format_rate, matmul_peak
    from engine.model import build_tokenizer
    from engine.parallel import compute_dtype

    if args.against == "trl":  # before any fsdpo mode runs
        import_trl()
    cfg = load_config(args.recipe, args.overrides)
    world = init_distributed()
    if args.against == "trl" and losses.unpaired(cfg.loss):
        raise UserError(f"--against trl: the TRL runner is DPOTrainer's, not for loss.type {cfg.loss.type!r}")
    if args.against == "trl" and world.world_size > 1:
        raise UserError("--against trl: run it in one process (without torchrun)")
    t = cfg.training
    layouts = {m: parse_mode(m, cfg) for m in modes}
    for m, (_, budget) in layouts.items():  # before any mode runs: the recipe's rules for each mode
        n = mode_config(m, cfg).parallel.sequence_parallel
        _, data_ranks = data_parallel(world.rank, world.world_size, n)
        # the sampler's rule: pairs split over data-parallel ranks and micro-batches
        BatchPlan.split(t.global_batch_size, t.micro_batch_size, data_ranks, budget)
    tokenizer = build_tokenizer(cfg.model)
    overrides = _parse_model_config(args.model_config)
    labels = None
    if args.synthetic_pairs:
        if losses.unpaired(cfg.loss):
            raise UserError(
                f"--synthetic-pairs: loss.type {cfg.loss.type!r} takes labelled unpaired examples: bench it on "
                "the recipe's data"
            )
        lo, hi = (int(x) for x in args.completion_len.split(","))
        vocab = overrides.get("vocab_size") or len(tokenizer)
        pairs = synthetic_pairs(
            args.synthetic_pairs, args.prompt_len, (lo, hi), vocab, cfg.data.max_length, cfg.job.seed
        )
    else:
        pairs, labels = recipe_pairs(cfg, tokenizer)
    setup = Setup(cfg, pairs, tokenizer.pad_token_id, args.steps, args.warmup, args.rounds, overrides, labels)
    for m, (layout, budget) in layouts.items():
        longest = int(FORWARD_MODES[layout].pair_positions(setup.lengths).max()) if budget else 0
        if longest > budget:
            raise UserError(
                f"--modes: {m}: the token budget {budget} is smaller than a pair of {longest} tokens"
            )
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
            raw[name] = result if name not in raw else merge_rounds(raw[name], result)
    peaks.append(matmul_peak(world.device, dtype, args.matmul_size))
    rates = reduce_over_ranks(
        [rate for rate, _ in peaks], world.device, dist.ReduceOp.MIN
    )  # the slowest rank's
    peak = device_peak(world.device, dtype, (max(rates), max(peaks)[1]))

    results = {name: summarize(r, peak.flops, world.world_size) for name, r in raw.items()}
    for name, r in raw.items():
        results[name]["step_times_s"] = r["step_times_s"]
    comparisons = [(m, "concatenated") for m in modes if m != "concatenated"]
    comparisons += [("prefix_shared", "packed")] + [(m, "trl") for m in modes]
    comparisons += [(m, layouts[m][0]) for m in modes if "@" in m]  # token budget vs fixed pairs
    sequence = [
        (m, without_sequence_parallel(m)) for m in modes if results[m].get("sequence_parallel", 1) > 1
    ]
    ratios = {
        f"{a}/{b}": paired_speedup(raw[a]["step_times_s"], raw[b]["step_times_s"])
        for a, b in comparisons + sequence
        if a in raw and b in raw
    }
    for a, b in sequence:  # per-rank memory under sequence parallelism against the unsplit rows
        if b in raw:
            for key in ("peak_mem", "peak_mem_above_start"):
                split, whole = results[a][f"{key}_gib"], results[b][f"{key}_gib"]
                ratios[f"{key} {a}/{b}"] = split / whole if whole > 0 else float("nan")
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


def entry() -> None:
    """`python -m engine.bench`: `main`, a UserError as one line and exit code 2."""
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
