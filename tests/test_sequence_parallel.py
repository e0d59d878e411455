"""Sequence parallelism (`parallel.sequence_parallel`): a row split over a sequence group of
ranks equals the unsplit row on one rank (losses, gradients, reference log-probs) in every
forward mode, the deviation does not grow with the group, checkpoints and reference caches move
between group sizes and world sizes, and the settings it cannot serve are errors."""

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
    save_random_llama,
    sweep_stdout,
    train_rows,
    write_recipe,
)

MODES = ("packed", "prefix_shared", "concatenated")
PACKED = ["training.forward_mode=packed"]
# each on 2 ranks split over one sequence group against 1 rank; beta-DPO's statistics are the
# step's global batch (all-gathered: a sequence group's ranks hold the same pairs); TDPO's live
# reference runs split too, its token-level KL summed over the group; LoRA adapters (the
# long-context LoRA DPO users report OOMs with) train split as the full model does
VARIANTS = {
    **{mode: [f"training.forward_mode={mode}"] for mode in MODES},
    "beta_dpo": [*PACKED, "loss.type=beta_dpo"],
    "tdpo_live": [*PACKED, "loss.type=tdpo", "reference.mode=live"],
    "lora": ["training.forward_mode=prefix_shared", "lora.enabled=true", "optimizer.lr=1e-2"],
}
BUDGET = 192  # training.micro_batch_tokens of data 2 x sequence 2: a group's row, 96 per rank


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("sequence-parallel")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"].update(train=[{"path": str(small_data["train"]), "count": 40}], eval=[])  # 5 steps
    tables["training"]["max_steps"] = 5
    tables["export"] = {"enabled": False}
    return write_recipe(tmp / "r.toml", tables)


@pytest.fixture(scope="module")
def heads4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4 KV heads (as many as its query heads), which split 1, 2 or 4 ways."""
    return save_random_llama(tmp_path_factory.mktemp("heads4"), {"num_key_value_heads": 4})


@pytest.fixture(scope="module")
def split(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Each variant trained on one sequence group of 2 ranks, and packed again with a
    checkpoint at step 3 (one launch)."""
    out = tmp_path_factory.mktemp("split")
    runs = {name: [*VARIANTS[name], "parallel.sequence_parallel=2"] for name in VARIANTS}
    runs["checkpointed"] = [*runs["packed"], "checkpoint.interval_steps=3"]
    return out, run_sweep(recipe, out, runs, nproc=2)


@pytest.fixture(scope="module")
def four(recipe: Path, heads4: Path, split: tuple[Path, dict], tmp_path_factory) -> tuple[Path, dict]:
    """One 4-rank launch. The 4-KV-head model as sequence 4 (data 1), data 2 x sequence 2 in
    token-budget micro-batches, and data 4 (N = 1) reading N = 4's reference cache; then the tiny
    model's step-3 checkpoint of sequence 2 on 2 ranks (data 1) resumed as data 2 x sequence 2."""
    out = tmp_path_factory.mktemp("four")
    model = [*PACKED, f"model.path={heads4}"]
    saved = split[0] / "checkpointed" / "checkpoints" / "step-3"
    runs = {
        "n4": [*model, "parallel.sequence_parallel=4"],
        "n2": [*model, "parallel.sequence_parallel=2", f"training.micro_batch_tokens={BUDGET}"],
        "n1": [*model, "training.micro_batch_size=2", f"reference.cache_dir={out / 'n4' / 'reference'}"],
        "resumed": [
            *PACKED,
            "parallel.sequence_parallel=2",
            "training.micro_batch_size=4",
            f"checkpoint.resume={saved}",
        ],
    }
    return out, run_sweep(recipe, out, runs, nproc=4)


@pytest.fixture(scope="module")
def one_rank(recipe: Path, heads4: Path, tmp_path_factory: pytest.TempPathFactory, world):
    """The output folder of the recipe trained as `VARIANTS[name]` (or "heads4": packed, the
    4-KV-head model) on this process's one rank."""
    runs: dict[str, Path] = {}
    variants = {**VARIANTS, "heads4": [*PACKED, f"model.path={heads4}"]}

    def run(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"one-{name}")
            proc = main_in_process(recipe, [*variants[name], f"job.output_dir={out}"])
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            runs[name] = out
        return runs[name]

    return run


def _deviation(one: Path, split: Path, losses: list[float], cached: bool = True) -> float:
    """`split` (a sweep run: its folder and losses) trained as `one` did, to 1e-5: step-0 loss
    ln 2 with the policy's log-probs its reference's, the loss curve, the gradient norms and,
    when `cached`, the reference log-probs of every pair. Returns the largest relative deviation
    of the losses and gradient norms."""
    expected = [row["loss"] for row in train_rows(one)]
    moved = max(abs(loss - expected[0]) for loss in expected)  # it trained
    assert len(expected) == 5 and moved > 1e-3, expected
    assert abs(losses[0] - LN2) < 1e-6, losses  # the policy is its reference at step 0
    first = train_rows(split)[0]
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6, first
    gaps = []
    for a, b in zip(expected, losses, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (expected, losses)
        gaps.append(abs(a - b) / abs(a))
    # the gradient itself (Adam and clipping would hide a gradient scaled by N from the losses)
    norms = [[row["grad_norm"] for row in train_rows(d)] for d in (one, split)]
    for a, b in zip(*norms, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), norms
        gaps.append(abs(a - b) / abs(a))
    if cached:  # per-sequence log-probs of every pair: the reference pass, split over the group
        mine, theirs = _reference(split), _reference(one)
        assert torch.equal(mine["pair_hashes"], theirs["pair_hashes"])
        for name in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6)
    return max(gaps)


def _reference(output_dir: Path) -> dict[str, torch.Tensor]:
    (path,) = (output_dir / "reference").glob("reference-*.safetensors")
    return safetensors.torch.load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_two_ranks_split_equal_one_rank(split: tuple[Path, dict], one_rank, name: str) -> None:
    out, results = split
    assert "2 ranks (data 1 x sequence 2: each row split over 2 ranks)" in sweep_stdout(out)[name]
    _deviation(one_rank(name), out / name, results[name]["losses"], cached=name != "tdpo_live")


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
    proc = main_in_process(recipe, [*PACKED, f"job.output_dir={resumed}", f"checkpoint.resume={saved}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stdout
    _continues(one_rank("packed"), train_rows(resumed))


def _continues(one: Path, rows: list[dict]) -> None:
    """`rows` are steps 4 and 5 of `one`'s curve, to 1e-5."""
    expected = [row["loss"] for row in train_rows(one)][3:]
    assert [row["step"] for row in rows] == [4, 5], rows
    for a, b in zip(expected, [row["loss"] for row in rows], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (expected, rows)


@pytest.mark.slow
def test_deviation_does_not_grow_with_the_group(four: tuple[Path, dict], one_rank) -> None:
    """On 4 ranks, N = 1 (data 4), 2 (data 2, token budgets) and 4 (data 1) each equal 1 rank to
    1e-5 (N = 2's and 4's reference passes too); the largest relative deviation of the losses and
    gradient norms at N = 2 and 4 is within 2 x N = 1's, where no row is split (fp32 reduction
    order only), or 2e-6 where N = 1's is below 1e-6."""
    out, results = four
    stdout = sweep_stdout(out)
    assert "4 ranks, sharding" in stdout["n1"]
    assert "4 ranks (data 2 x sequence 2: each row split over 2 ranks)" in stdout["n2"]
    assert (
        f"micro-batches of up to {BUDGET} tokens, {BUDGET // 2} per rank of a sequence group" in stdout["n2"]
    )
    assert "4 ranks (data 1 x sequence 4: each row split over 4 ranks)" in stdout["n4"]
    one = one_rank("heads4")
    gaps = {n: _deviation(one, out / f"n{n}", results[f"n{n}"]["losses"], n > 1) for n in (1, 2, 4)}
    print("largest relative deviation from 1 rank by N:", gaps)
    assert all(gaps[n] <= 2 * max(gaps[1], 1e-6) for n in (2, 4)), gaps


@pytest.mark.slow
def test_reference_cache_is_reused_across_n(four: tuple[Path, dict]) -> None:
    """N = 1 read the file sequence 4 wrote (the cache key has no parallel setting) and ran no
    reference pass; N = 2 and N = 4 computed theirs."""
    out, results = four
    assert [results[f"n{n}"]["reference_forwards"] for n in (1, 2, 4)] == [0, 1, 1]
    assert f"loaded {out / 'n4' / 'reference'}" in sweep_stdout(out)["n1"]


@pytest.mark.slow
def test_resume_on_another_world_size_and_data_degree(four: tuple[Path, dict], one_rank) -> None:
    """The step-3 checkpoint of sequence 2 on 2 ranks (data 1) resumed on 4 ranks as data 2 x
    sequence 2 continues the 1-rank curve to 1e-5."""
    out, _ = four
    assert "resumed from" in sweep_stdout(out)["resumed"]
    _continues(one_rank("packed"), train_rows(out / "resumed"))


def test_padded_rows_laid_end_to_end_score_as_the_padded_forward(tiny_model_dir: Path) -> None:
    """`as_one_row`, the padded modes' layout under sequence parallelism: the concatenated and
    separate layouts' rows as one row of the same positions give the padded forward's log-probs
    and gradients (1 rank: the split itself is the launches above)."""
    from transformers import AutoModelForCausalLM

    from engine.forward import FORWARD_MODES, SequenceLogprobs, as_one_row, score_pairs

    model = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    batch = _pairs()
    for mode in ("concatenated", "separate"):
        results = []
        for rows in (lambda x: x, as_one_row):
            model.zero_grad(set_to_none=True)
            inputs = [rows(x) for x in FORWARD_MODES[mode].inputs(batch, 0, torch.device("cpu"))]
            assert all((x.segments is None) == (rows is not as_one_row) for x in inputs)
            out = score_pairs(model, inputs)
            (out.chosen_logps.sum() - 0.7 * out.rejected_logps.sum()).backward()
            results.append((out, [p.grad.clone() for p in model.parameters()]))
        (padded, padded_grads), (one, one_grads) = results
        for name in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"):
            torch.testing.assert_close(getattr(one, name), getattr(padded, name), rtol=1e-5, atol=1e-5)
        for a, b in zip(one_grads, padded_grads, strict=True):  # to 1e-5 of each tensor's largest
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), mode


def _pairs():
    """3 random pairs of varied lengths (one token the shortest)."""
    from engine.data import PairBatch

    g = torch.Generator().manual_seed(5)
    lengths = [(3, 9, 1), (11, 2, 7), (1, 5, 12)]
    prompts, chosen, rejected = (
        [torch.randint(3, 400, (n[i],), generator=g).tolist() for n in lengths] for i in range(3)
    )
    return PairBatch(torch.arange(3), torch.ones(3, dtype=torch.bool), prompts, chosen, rejected)


def test_a_rank_may_hold_a_prompt_whose_completions_are_on_the_next() -> None:
    """`shard_row` of a prefix-shared row of one pair (prompt 10, chosen 3, rejected 3: 16
    positions) over 2 ranks: the cut falls inside the prompt, rank 0 holds only prompt positions
    and scores nothing, rank 1 every scored token (re-based to its slice, the same targets), and
    both keep the whole row's token counts; an odd row is padded by one position."""
    from engine.data import PairBatch
    from engine.forward import FORWARD_MODES, shard_row
    from engine.sequence_parallel import SequenceGroup

    cpu = torch.device("cpu")
    batch = PairBatch(
        torch.arange(1), torch.ones(1, dtype=torch.bool), [list(range(3, 13))], [[20, 21, 22]], [[30, 31, 32]]
    )
    (row,) = FORWARD_MODES["prefix_shared"].layout(batch, 0, cpu)
    shards = [shard_row(row, SequenceGroup(None, 2, k), cpu) for k in (0, 1)]
    assert [s.input_ids.shape[1] for s in shards] == [8, 8]
    assert torch.equal(torch.cat([s.input_ids for s in shards], 1), row.input_ids)
    assert shards[0].score_positions.numel() == 0
    assert torch.equal(shards[1].score_positions + 8, row.score_positions)
    assert torch.equal(shards[1].score_targets, row.score_targets)
    assert all(torch.equal(s.sequence_tokens, torch.tensor([3, 3])) for s in shards)
    odd = PairBatch(torch.arange(1), torch.ones(1, dtype=torch.bool), [[3]], [[4]], [[5, 6]])
    (row,) = FORWARD_MODES["packed"].layout(odd, 0, cpu)  # [3, 4 | 3, 5, 6]: 5 positions
    assert shard_row(row, SequenceGroup(None, 2, 1), cpu).input_ids.tolist() == [[5, 6, 0]]


def test_a_model_whose_attention_ignores_the_exchange_is_an_error(tiny_model_dir: Path) -> None:
    """A model with attention code of its own (here: its config switched back to plain sdpa after
    the wrapper registered the segment attention) cannot run packed rows, nor a split row: its
    attention would see only this rank's positions. One line naming the setting to change."""
    from transformers import AutoModelForCausalLM

    from engine.forward import SequenceLogprobs, policy_logps
    from engine.sequence_parallel import SequenceGroup

    model = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    model.causal_lm.config._attn_implementation = "sdpa"
    cpu = torch.device("cpu")
    with pytest.raises(
        UserError, match=r'cannot run packed rows; use training.forward_mode = "concatenated"$'
    ):
        policy_logps("packed", model, _pairs(), 0, cpu)
    model.sequence = SequenceGroup(None, 2, 0)  # the exchange is never reached: no process group needed
    with pytest.raises(
        UserError, match=r"^model.path: LlamaForCausalLM does not route .*parallel.sequence_parallel = 1"
    ):
        policy_logps("concatenated", model, _pairs(), 0, cpu)


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
    overrides = ["parallel.sequence_parallel=2", *PACKED]
    proc = main_in_process(recipe, [*overrides, f"job.output_dir={tmp_path}"])
    assert proc.returncode == 2
    assert "parallel.sequence_parallel=2 must divide the 1 ranks" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.compile=true"], "parallel.compile: not supported with parallel.sequence_parallel=2"),
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
    assert "parallel.sequence_parallel=2: each rank holds 1/2 of every row" in plan
    budget = ["training.forward_mode=packed", "training.micro_batch_tokens=4096"]
    plan = dry_run(load_config(recipe, [*budget, "parallel.sequence_parallel=2"]), 4, 4)
    assert "up to 4096 tokens per sequence group's row per forward (2048 per rank)" in plan
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
