"""Sequence parallelism (`parallel.sequence_parallel`): a packed row split over a sequence group
of ranks equals the unsplit row on one rank (losses, gradients, reference log-probs), and the
settings it cannot serve are errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig

from engine.errors import UserError
from engine.recipe import load_config
from engine.sequence_parallel import check_heads, data_parallel
from tests.conftest import (
    ASSETS,
    LN2,
    base_tables,
    main_in_process,
    run_sweep,
    sweep_stdout,
    train_rows,
    write_recipe,
)

MODES = ("packed", "prefix_shared")
# each on 2 ranks split over one sequence group against 1 rank; beta-DPO's statistics are the
# step's global batch (all-gathered: a sequence group's ranks hold the same pairs)
VARIANTS = {
    **{mode: [f"training.forward_mode={mode}"] for mode in MODES},
    "beta_dpo": ["training.forward_mode=packed", "loss.type=beta_dpo"],
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("sequence-parallel")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"].update(train=[{"path": str(small_data["train"]), "count": 40}], eval=[])  # 5 steps
    tables["training"]["max_steps"] = 5
    tables["export"] = {"enabled": False}
    return write_recipe(tmp / "r.toml", tables)


@pytest.fixture(scope="module")
def split(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Each forward mode trained on one sequence group of 2 ranks, and packed again with a
    checkpoint at step 3 (one launch)."""
    out = tmp_path_factory.mktemp("split")
    runs = {name: [*VARIANTS[name], "parallel.sequence_parallel=2"] for name in VARIANTS}
    runs["checkpointed"] = [*runs["packed"], "checkpoint.interval_steps=3"]
    return out, run_sweep(recipe, out, runs, nproc=2)


@pytest.fixture(scope="module")
def four(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Data 2 x sequence 2 on 4 ranks (the reference pass, the sampler and the metrics then see
    two data-parallel ranks, each a sequence group)."""
    out = tmp_path_factory.mktemp("four")
    runs = {
        "packed": [
            "training.forward_mode=packed",
            "parallel.sequence_parallel=2",
            "training.micro_batch_size=4",
        ]
    }
    return out, run_sweep(recipe, out, runs, nproc=4)


@pytest.fixture(scope="module")
def one_rank(recipe: Path, tmp_path_factory: pytest.TempPathFactory, world):
    """The output folder of the recipe trained as `VARIANTS[name]` on this process's one rank."""
    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"one-{name}")
            proc = main_in_process(recipe, [*VARIANTS[name], f"job.output_dir={out}"])
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            runs[name] = out
        return runs[name]

    return run


def _same_training(one: Path, split: Path, losses: list[float], what: str) -> None:
    """`split` (a sweep run: its folder and losses) trained as `one` did: step-0 loss ln 2, the
    loss curve and the gradient norms to 1e-5, and the reference log-probs of every pair."""
    expected = [row["loss"] for row in train_rows(one)]
    moved = max(abs(loss - expected[0]) for loss in expected)  # it trained
    assert len(expected) == 5 and moved > 1e-3, expected
    assert abs(losses[0] - LN2) < 1e-6, losses  # the policy is its cached reference at step 0
    for a, b in zip(expected, losses, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (what, expected, losses)
    # the gradient itself (Adam and clipping would hide a gradient scaled by N from the losses)
    norms = [[row["grad_norm"] for row in train_rows(d)] for d in (one, split)]
    for a, b in zip(*norms, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), (what, norms)
    # per-sequence log-probs of every pair: the reference pass, split over the group
    mine, theirs = _reference(split), _reference(one)
    assert torch.equal(mine["pair_hashes"], theirs["pair_hashes"])
    for name in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6)


def _reference(output_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = (output_dir / "reference").glob("reference-*.safetensors")
    return safetensors.torch.load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_two_ranks_split_equal_one_rank(split: tuple[Path, dict], one_rank, name: str) -> None:
    out, results = split
    assert "2 ranks (data 1 x sequence 2: each row split over 2 ranks)" in sweep_stdout(out)[name]
    _same_training(one_rank(name), out / name, results[name]["losses"], name)


@pytest.mark.slow
def test_resume_on_one_rank_without_sequence_parallelism(
    split: tuple[Path, dict], one_rank, recipe: Path, world, tmp_path: Path
) -> None:
    """The step-3 checkpoint of sequence 2 on 2 ranks, resumed on this process's one rank with
    N = 1, continues the uninterrupted curve (1 rank's, as the 2 ranks' is) to 1e-5."""
    out, results = split
    saved = out / "checkpointed" / "checkpoints" / "step-3"
    assert saved.is_dir()
    assert results["checkpointed"]["losses"] == results["packed"]["losses"]  # saving changes nothing
    resumed = tmp_path / "resumed"
    proc = main_in_process(
        recipe, [*VARIANTS["packed"], f"job.output_dir={resumed}", f"checkpoint.resume={saved}"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stdout
    rows = train_rows(resumed)
    expected = [row["loss"] for row in train_rows(one_rank("packed"))][3:]
    assert [row["step"] for row in rows] == [4, 5], rows
    for a, b in zip(expected, [row["loss"] for row in rows], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (expected, rows)


@pytest.mark.slow
def test_data_two_by_sequence_two_equals_one_rank(four: tuple[Path, dict], one_rank) -> None:
    out, results = four
    assert "4 ranks (data 2 x sequence 2: each row split over 2 ranks)" in sweep_stdout(out)["packed"]
    _same_training(one_rank("packed"), out / "packed", results["packed"]["losses"], "data 2 x sequence 2")


def test_data_parallel_rank_and_divisibility() -> None:
    assert data_parallel(5, 8, 2) == (2, 4)
    assert data_parallel(3, 4, 1) == (3, 4)
    with pytest.raises(UserError, match=r"parallel.sequence_parallel=3 must divide the 4 ranks"):
        data_parallel(0, 4, 3)


def test_heads_must_split() -> None:
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")  # 4 heads, 2 KV heads
    check_heads(config, 2)
    with pytest.raises(UserError, match=r"4 attention heads and 2 KV heads must each split 4 ways"):
        check_heads(config, 4)


def test_n_not_dividing_the_world_is_an_error(recipe: Path, world, tmp_path: Path) -> None:
    overrides = ["parallel.sequence_parallel=2", "training.forward_mode=packed"]
    proc = main_in_process(recipe, [*overrides, f"job.output_dir={tmp_path}"])
    assert proc.returncode == 2
    assert "parallel.sequence_parallel=2 must divide the 1 ranks" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.forward_mode=concatenated"], "training.forward_mode: parallel.sequence_parallel=2"),
        (["parallel.compile=true"], "parallel.compile: not supported with parallel.sequence_parallel=2"),
        (
            ["reference.mode=live", "loss.type=tdpo"],
            "reference.mode: not supported with parallel.sequence_parallel=2",
        ),
        (["parallel.sequence_parallel=0"], "parallel.sequence_parallel: expected an integer >= 1"),
    ],
)
def test_settings_it_cannot_serve(recipe: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(recipe, ["parallel.sequence_parallel=2", *overrides])


def test_dry_run_plans_the_data_parallel_ranks(recipe: Path) -> None:
    from engine.plan import dry_run

    packed = ["training.forward_mode=packed", "training.micro_batch_size=4"]
    plan = dry_run(load_config(recipe, [*packed, "parallel.sequence_parallel=2"]), 4, 4)
    assert "4 (4 per node, 1 node, data 2 x sequence 2)" in plan
    assert "1 = 8 / (4 x 2 data-parallel ranks)" in plan
    assert "parallel.sequence_parallel=2: each rank holds 1/2 of every packed row" in plan
    with pytest.raises(UserError, match="2 KV heads must each split 4 ways"):
        dry_run(load_config(recipe, [*packed, "parallel.sequence_parallel=4"]), 4, 4)
    with pytest.raises(UserError, match="sequence_parallel=3 must divide the 4 ranks"):
        dry_run(load_config(recipe, [*packed, "parallel.sequence_parallel=3"]), 4, 4)


def test_dry_run_memory_per_rank_falls_with_n(recipe: Path) -> None:
    """Llama-3-8B (h 4096, i 14336, 32 blocks, vocab 128256) on 8 ranks, 2 x 4096-token pairs per
    micro-batch (a 16384-token packed row), every block checkpointed: a rank's activations are
    ceil(16384 / N) tokens x 2 B (bf16) x (32 x 4096 kept inputs + 8 x 4096 + 4 x 14336 of the
    recomputed block); the rest does not depend on N; the longest row that fits is the last
    token count within each GPU's memory less the reserve."""
    from engine.plan import GIB, GPU_GIB, RESERVE_GIB, format_plan, plan_run

    config = AutoConfig.from_pretrained(Path(__file__).parent / "data" / "configs" / "llama-3-8b")
    base = [
        "training.forward_mode=packed",
        "training.micro_batch_size=2",
        "training.global_batch_size=16",
        "data.max_length=4096",
        "parallel.activation_checkpointing=full",
        "training.logprob_chunk_tokens=1024",
    ]
    per_token = 2 * (32 * 4096 + 8 * 4096 + 4 * 14336)
    fixed = None
    for n in (1, 2, 4, 8):
        cfg = load_config(recipe, [*base, f"parallel.sequence_parallel={n}"])
        plan = plan_run(cfg, config, 8, 8)
        memory = plan.memory
        assert memory.get("activations") == math.ceil(16384 / n) * per_token, n
        assert memory.get("head_chunk") == 1024 * 128256 * (2 + 8)
        rest = memory.device_total - memory.get("activations")
        assert fixed in (None, rest)
        fixed = rest
        expected = [((gib - RESERVE_GIB) * GIB - rest) // per_token for gib in GPU_GIB]
        assert plan.fits == expected and expected[0] > 16384, (plan.fits, expected)
        text = format_plan(cfg, plan, [])
        fits = ", ".join(f"{t} in {g} GiB" for g, t in zip(GPU_GIB, expected, strict=True))
        assert f"tokens per rank per forward: {fits} of GPU memory" in text
        assert (f"a row over the {n} ranks of a sequence group: {n} x that" in text) == (n > 1)
        if n > 1:
            assert f"{16384 // n} tokens per rank (1/{n} of a 16384-token row)" in text
