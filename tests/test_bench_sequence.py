"""The bench under sequence parallelism (`packed:sp2`): a sequence group's ranks share their pairs
(counted once), and the bytes it reports sending equal a hand count from the model's shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from engine.bench import cli
from engine.bench.common import synthetic_pairs
from engine.bench.modes import mode_parallel, without_sequence_parallel
from engine.errors import UserError
from engine.recipe import load_config
from tests.conftest import REPO, base_tables, training_env, write_recipe
from tests.forked import fork_launch

STEPS = ["--steps", "1", "--warmup", "1"]  # the timed step is step 1: pairs 4..7
PAIRS = ["--synthetic-pairs", "8", "--prompt-len", "20", "--completion-len", "5,40", "--matmul-size", "64"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("bench-sequence")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"]["max_length"] = 96
    tables["training"].update(global_batch_size=4, micro_batch_size=2)
    return write_recipe(tmp / "bench.toml", tables)


def _rows(model_dir: Path) -> list[int]:
    """Positions of the timed step's packed rows of 2 pairs (2 prompts + chosen + rejected each),
    the synthetic pairs drawn as the bench draws them (`--synthetic-pairs 8`, seed 7)."""
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    pairs = synthetic_pairs(8, 20, (5, 40), vocab, 96, 7)[4:8]
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in pairs]
    return [lengths[0] + lengths[1], lengths[2] + lengths[3]]


@pytest.mark.slow
def test_sequence_parallel_bench_counts_pairs_once_and_its_traffic(
    recipe: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    args = [str(recipe), *STEPS, *PAIRS, "--modes", "packed,packed:sp2,packed:full:sp2", "--out", str(out)]
    proc = fork_launch("bench", args, 2, training_env(), 240, REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    modes = report["modes"]
    whole, split, recomputed = modes["packed"], modes["packed:sp2"], modes["packed:full:sp2"]
    # the same 4 pairs per step: 2 per rank (data 2) or 4 per sequence group (data 1), counted once
    for row in (split, recomputed):
        for key in ("pair_tokens_per_step", "computed_tokens_per_step", "model_flops_per_step"):
            assert row[key] == whole[key], key
    assert whole["computed_tokens_per_step"] == sum(_rows(tiny_model_dir))
    assert (whole["forwards_per_step"], split["forwards_per_step"]) == (1, 2)
    assert split["sequence_parallel"] == 2 and whole["sequence_parallel"] == 1

    # hand count, bus bytes ((N-1)/N of each tensor, N = 2) of fp32 tensors
    c = AutoConfig.from_pretrained(tiny_model_dir)
    heads, kv, dim, layers = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers
    # each attention layer of a row padded to even length: q, k, v to heads, the output back,
    # each [T/2 positions x its heads x head_dim] on this rank, half of it sent
    per_pass = sum(
        layers * (2 * heads + 2 * kv) * dim * (t + t % 2) // 2 * 4 // 2 for t in _rows(tiny_model_dir)
    )
    assert split["comm_bytes_per_step"]["sequence_all_to_all"] == 2 * per_pass  # forward + backward
    assert recomputed["comm_bytes_per_step"]["sequence_all_to_all"] == 3 * per_pass  # + full recompute
    assert whole["comm_bytes_per_step"]["sequence_all_to_all"] == 0
    # FSDP over 2 ranks: every parameter gathered per forward, again in backward but the output
    # unit's (final norm, LM head: kept from forward to backward), gradients reduce-scattered per
    # micro-batch
    h, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    block = h * heads * dim * 2 + h * kv * dim * 2 + 3 * h * inter + 2 * h
    params = vocab * h + layers * block + h + h * vocab
    gather, regather = params * 4 // 2, (params - h - h * vocab) * 4 // 2
    for row, forwards in ((whole, 1), (split, 2)):
        comm = row["comm_bytes_per_step"]
        assert comm["fsdp_all_gather"] == forwards * (gather + regather)
        assert comm["fsdp_reduce_scatter"] == forwards * params * 4 // 2
        assert comm["fsdp_all_reduce"] == 0
    ratios = report["ratios"]
    for key in ("packed:sp2/packed", "peak_mem packed:sp2/packed", "peak_mem_above_start packed:sp2/packed"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0, (key, ratios)
    assert "peak_mem packed:full:sp2/packed:full" not in ratios  # no unsplit packed:full ran


def test_sequence_parallel_mode_option(recipe: Path, world) -> None:
    """`:spN` sets `parallel.sequence_parallel`; the recipe's rules and the sampler's split reject
    what it cannot serve before any mode runs (one line each)."""
    cfg = load_config(recipe)
    assert mode_parallel("packed@64:full:sp2", cfg).sequence_parallel == 2
    assert without_sequence_parallel("packed@64:full:sp2") == "packed@64:full"
    with pytest.raises(UserError, match="unknown option 'sp0'"):
        mode_parallel("packed:sp0", cfg)
    common = [str(recipe), *STEPS, *PAIRS]
    with pytest.raises(
        UserError,
        match=r"^--modes: packed:compile:sp2: parallel\.compile: not supported with parallel\.sequence_parallel=2",
    ):
        cli.main([*common, "--modes", "packed,packed:compile:sp2"])
    with pytest.raises(UserError, match=r"^parallel\.sequence_parallel=2 must divide the 1 ranks$"):
        cli.main([*common, "--modes", "packed,packed:sp2"])
