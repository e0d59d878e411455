"""The forward-mode benchmark runs and reports what it documents; packed forward modes train the
same curves as the concatenated one (2 ranks, one launch)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench import cli, logprob_memory
from engine.bench.modes import RESULT_KEYS, mode_parallel
from engine.errors import UserError
from tests.conftest import REPO, base_tables, run_sweep, write_recipe


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["training"].update(global_batch_size=4, micro_batch_size=2)
    return write_recipe(tmp / "bench.toml", tables)


def test_bench_reports_every_mode(recipe: Path, tmp_path: Path, world) -> None:
    out = tmp_path / "bench.json"
    report = cli.main(
        [str(recipe), "data.max_length=96", "--steps", "2", "--warmup", "1", "--synthetic-pairs", "8",
         "--prompt-len", "20", "--completion-len", "5,40", "--matmul-size", "256", "--out", str(out),
         "--modes", "concatenated,separate,packed,prefix_shared,packed@192"]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["modes"]) == {"concatenated", "separate", "packed", "prefix_shared", "packed@192"}
    for mode, row in report["modes"].items():
        assert set(RESULT_KEYS) <= set(row), mode
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_mem_gib"] > 0, mode
        assert len(row["step_times_s"]) == 2
        assert math.isclose(
            row["pair_tokens_per_step"], report["modes"]["concatenated"]["pair_tokens_per_step"]
        )
    modes = report["modes"]
    assert modes["packed"]["padding_fraction"] == 0 and modes["concatenated"]["padding_fraction"] > 0
    # prefix sharing computes each prompt once: fewer positions than the pair tokens
    assert modes["prefix_shared"]["computed_tokens_per_step"] < modes["packed"]["computed_tokens_per_step"]
    assert modes["packed"]["computed_tokens_per_step"] == modes["packed"]["pair_tokens_per_step"]
    assert "packed/concatenated" in report["ratios"] and "prefix_shared/packed" in report["ratios"]
    assert report["setup"]["matmul_flops"] > 0
    # on CPU the MFU peak is the measured matmul rate (engine.metrics.device_peak)
    assert report["setup"]["peak_flops"] == report["setup"]["matmul_flops"]
    assert report["setup"]["peak_source"].startswith("measured matmul")
    # the one FLOP count: padding costs, a shared prompt saves
    flops = {m: row["model_flops_per_step"] for m, row in modes.items()}
    assert flops["prefix_shared"] < flops["packed"] < flops["separate"] <= flops["concatenated"]
    # 4 pairs per step in micro-batches of 2; a 192-token budget (two sequences of max_length)
    # holds at least one pair and never more than 192 positions per forward
    assert modes["packed"]["forwards_per_step"] == modes["concatenated"]["forwards_per_step"] == 2
    assert modes["separate"]["forwards_per_step"] == 4  # chosen and rejected: two forwards each
    for mode, row in modes.items():  # positions per forward x forwards = positions per step
        assert math.isclose(
            row["micro_batch_tokens_mean"] * row["forwards_per_step"], row["computed_tokens_per_step"]
        ), mode
    budgeted = modes["packed@192"]
    assert budgeted["micro_batch_tokens_max"] <= 192 and 1 <= budgeted["forwards_per_step"] <= 4
    assert budgeted["pair_tokens_per_step"] == modes["packed"]["pair_tokens_per_step"]
    assert "packed@192/packed" in report["ratios"] and report["setup"]["micro_batch_tokens"] == {
        "packed@192": 192
    }


def test_bench_runs_an_unpaired_loss_on_the_recipes_examples(recipe: Path, tmp_path: Path, world) -> None:
    """kto benches on the recipe's pairs split into labelled examples (`recipe_pairs`), as the
    trainer builds them; synthetic pairs have no labels."""
    kto = [str(recipe), "loss.type=kto", "data.unpair=true", "--steps", "1", "--warmup", "0"]
    report = cli.main([*kto, "--matmul-size", "64", "--modes", "packed", "--out", str(tmp_path / "b.json")])
    assert report["modes"]["packed"]["tokens_per_s"] > 0
    with pytest.raises(
        UserError, match=r"--synthetic-pairs: loss\.type 'kto' takes labelled unpaired examples"
    ):
        cli.main([*kto, "--synthetic-pairs", "8"])


@pytest.mark.slow
def test_bench_under_torchrun(recipe: Path, tmp_path: Path) -> None:
    """2 ranks: the step's pairs are split over ranks (work summed), a token budget gives both
    ranks the same number of forwards, and the processes exit cleanly."""
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.bench",
        str(recipe), "data.max_length=96", "training.global_batch_size=8", "--steps", "2", "--warmup", "0",
        "--synthetic-pairs", "16", "--prompt-len", "20", "--completion-len", "5,40", "--matmul-size", "256",
        "--modes", "packed,packed@192", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["setup"]["world_size"] == 2
    modes = report["modes"]
    # 8 pairs per step, 4 per rank in micro-batches of 2
    assert modes["packed"]["forwards_per_step"] == 2
    assert modes["packed@192"]["pair_tokens_per_step"] == modes["packed"]["pair_tokens_per_step"]
    assert modes["packed@192"]["micro_batch_tokens_max"] <= 192
    assert "packed@192/packed" in report["ratios"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [("concatenated@512", "packed@N"), ("packed@x", "positive integer"), ("packed@8", "budget 8")],
)
def test_bench_rejects_bad_token_budgets(recipe: Path, world, spec: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        cli.main([str(recipe), "--modes", spec, "--synthetic-pairs", "8", "--prompt-len", "20"])


def test_bench_against_trl_without_trl_stops_before_any_mode_runs(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ran(*args, **kwargs):
        raise AssertionError("an fsdpo mode ran before TRL was found missing")

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    monkeypatch.setattr(cli, "run_mode", ran)
    monkeypatch.setattr(cli, "load_config", ran)
    with pytest.raises(UserError, match=r"--against trl: TRL is not installed \(pip install trl\)"):
        cli.main([str(recipe), "--modes", "packed", "--steps", "1", "--warmup", "0", "--against", "trl"])


def test_logprob_step_memory_probe_runs() -> None:
    for variant in ("full_logits", "unchunked", "chunked"):
        result = logprob_memory.logprob_step(variant, vocab=64, hidden=8, rows=2, seq_len=16, chunk_tokens=8)
        # at these toy sizes the RSS delta is allocator noise and can be slightly negative
        assert result["variant"] == variant and math.isfinite(result["peak_delta_gib"])


@pytest.mark.slow
def test_packed_modes_train_the_concatenated_curve(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict
) -> None:
    """5 steps on 2 ranks (micro-batch 2, accumulation 2): losses equal to 1e-5. Also with
    token-budget micro-batches, whose budgets (just above the longest pair of this data) give
    the two ranks different numbers of micro-batches of their own on most steps
    (tests/test_data_sampler.py checks the split itself): the loss is still the global mean."""
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "unused")
    tables["data"]["eval"] = []
    tables["training"].update(max_steps=5, micro_batch_size=2)
    tables["export"] = {"enabled": False}
    tables["optimizer"]["lr"] = 1e-4  # Adam amplifies reduction-order noise at larger rates
    recipe = write_recipe(tmp_path / "curve.toml", tables)
    runs = {
        "concatenated": ["training.forward_mode=concatenated"],
        "packed": ["training.forward_mode=packed"],
        "prefix_shared": ["training.forward_mode=prefix_shared", "parallel.activation_checkpointing=full"],
        "packed_tokens": ["training.forward_mode=packed", "training.micro_batch_tokens=110"],
        "prefix_shared_tokens": ["training.forward_mode=prefix_shared", "training.micro_batch_tokens=64"],
    }
    results = run_sweep(recipe, tmp_path / "sweep", runs, nproc=2)
    base = results["concatenated"]["losses"]
    assert len(base) == 5
    for mode in ("packed", "prefix_shared", "packed_tokens", "prefix_shared_tokens"):
        assert len(results[mode]["losses"]) == 5
        for a, b in zip(results[mode]["losses"], base):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (mode, results[mode]["losses"], base)


def test_bench_compares_recompute_choices_and_compile_in_one_run(recipe: Path, world, monkeypatch) -> None:
    """`MODE:OPTION`: each recompute choice and compile side by side on the same pairs (dynamo's
    eager backend keeps the compile case quick: graphs and breaks are counted the same way)."""
    import torch

    from engine.recipe import load_config

    common = [str(recipe), "data.max_length=96", "--steps", "1", "--warmup", "1", "--synthetic-pairs", "8",
              "--prompt-len", "20", "--completion-len", "5,40", "--matmul-size", "128"]  # fmt: skip
    report = cli.main([*common, "--modes", "packed,packed:full,packed:selective,concatenated:selective"])
    modes = report["modes"]
    assert [modes[m]["recompute"] for m in modes] == ["none", "full", "selective", "selective"]
    # recompute changes the work done, never the model FLOPs counted (MFU counts no recompute)
    assert modes["packed:full"]["model_flops_per_step"] == modes["packed"]["model_flops_per_step"]
    with pytest.raises(UserError, match="unknown option 'fast'"):
        mode_parallel("packed:fast", load_config(recipe))
    parallel = mode_parallel("packed@64:selective:compile", load_config(recipe))
    assert parallel.activation_checkpointing == "selective" and parallel.compile
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: real_compile(self, **kw, backend="eager")
    )
    compiled = cli.main([*common, "--modes", "packed:compile"])["modes"]["packed:compile"]
    assert compiled["compile"]["graphs"] >= 1 and compiled["compile"]["graph_breaks"] == 0


def test_peak_memory_is_each_modes_own() -> None:
    """The CPU peak (engine.metrics.peak_memory_gib: the kernel's high-water mark) starts afresh
    at `reset_peak_memory`, as the bench does before each mode's timed steps: memory freed before
    the reset is out of the peak, memory touched after it is in."""
    import torch

    from engine.metrics import peak_memory_gib, reset_peak_memory

    cpu, block_gib = torch.device("cpu"), 0.125
    block = torch.ones(int(block_gib * 2**30) // 4)  # written, so resident
    held = peak_memory_gib(cpu)
    del block
    reset_peak_memory(cpu)
    after_reset = peak_memory_gib(cpu)
    assert after_reset < held - 0.75 * block_gib
    torch.ones(int(block_gib * 2**30) // 4)  # freed at once: the high-water mark keeps it
    assert peak_memory_gib(cpu) > after_reset + 0.75 * block_gib
