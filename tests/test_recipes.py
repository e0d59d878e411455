"""Shipped recipes load and dry-run; the dry-run plan matches hand-computed numbers.

The real recipes name hub models; tests have no network, so they point `model.path` at the
config-only folders in tests/data/configs/ (the real architectures' public config.json), which is
all a dry run reads. Data stays as hub ids where a recipe names them (a dry run does not read
rows) or is overridden to a local file.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import torchrun_train
from engine.data.sampler import plan_batches
from engine.parallel import mesh_shape
from engine.plan import estimate_memory, measure_model, plan_run
from engine.recipe import load_config
from tests.conftest import ASSETS, REPO

CONFIGS = REPO / "tests" / "data" / "configs"
LLAMA3_8B = CONFIGS / "llama-3-8b"
LLAMA31_70B = CONFIGS / "llama-3.1-70b"
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
DEMOS = {"demo.toml", "demo_lora.toml"}

# Llama-3-8B, by hand (hidden h = 4096, MLP i = 14336, 32 layers, 8 KV heads of 128, vocab 128256):
#   embeddings = LM head = 128256 x 4096                     =   525,336,576 each
#   attention  = q 4096x4096 + k 4096x1024 + v 4096x1024 + o 4096x4096 = 41,943,040
#   MLP        = 3 x 4096 x 14336                             =   176,160,768
#   norms      = 2 x 4096                                     =         8,192
#   one block  = 41,943,040 + 176,160,768 + 8,192             =   218,112,000
#   root       = 2 x 525,336,576 + final norm 4096            = 1,050,677,248
#   total      = 32 x 218,112,000 + 1,050,677,248             = 8,030,261,248
L8_BLOCK, L8_ROOT, L8_TOTAL = 218_112_000, 1_050_677_248, 8_030_261_248
# Llama-3.1-70B (h = 8192, i = 28672, 80 layers, 8 KV heads of 128):
#   block = q, o 2 x 8192^2 + k, v 2 x 8192x1024 + 3 x 8192 x 28672 + 2 x 8192 = 855,654,400
#   root  = 2 x 128256 x 8192 + 8192                                           = 2,101,354,496
#   total = 80 x 855,654,400 + 2,101,354,496                                    = 70,553,706,496
L70_BLOCK, L70_TOTAL = 855_654_400, 70_553_706_496


def _model_folder(config_dir: Path, tmp: Path) -> Path:
    """The architecture's config.json with the demo tokenizer as a stand-in: a dry run loads the
    model's tokenizer (and tokenises the first rows of the data), as the real run does."""
    folder = tmp / config_dir.name
    folder.mkdir(parents=True)
    shutil.copy(config_dir / "config.json", folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / "tiny-llama" / name, folder)
    return folder


def _overrides(recipe: Path, tmp: Path, data: Path) -> list[str]:
    """Offline stand-ins: the architecture's config folder, local data, a fresh output folder."""
    if recipe.name in DEMOS:
        return [f"job.output_dir={tmp / 'out'}"]
    model = _model_folder(LLAMA31_70B if "70b" in recipe.name else LLAMA3_8B, tmp)
    return [f"model.path={model}", f'data.train=["{data}"]', "data.eval=[]", f"job.output_dir={tmp / 'out'}"]


def _world(recipe: Path) -> list[str]:
    return (
        ["--world-size", "32", "--ranks-per-node", "8"]
        if "multinode" in recipe.name
        else ["--world-size", "8"]
    )


@pytest.fixture(autouse=True)
def _offline_and_no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)


def test_every_recipe_extends_a_base_and_cites_its_source() -> None:
    names = {r.name for r in RECIPES}
    for expected in (
        "base_8b.toml",
        "tulu3_8b_dpo_norm.toml",
        "simpo_llama3_8b_instruct.toml",
        "wpo_8b.toml",
        "multinode_70b_dpo.toml",
        "lora_8b_dpo.toml",
    ):
        assert expected in names
    for recipe in RECIPES:
        text = recipe.read_text()
        if recipe.name.startswith("base_") or recipe.name == "demo.toml":
            continue
        assert text.lstrip().startswith("#") and 'extends = "' in text, recipe.name
        if recipe.name not in DEMOS:
            assert "Source:" in text, recipe.name


def test_recipes_hold_the_published_hyperparameters(small_data: dict) -> None:
    over = [f"model.path={LLAMA3_8B}"]
    tulu = load_config(REPO / "recipes" / "tulu3_8b_dpo_norm.toml", over)
    assert (tulu.loss.type, tulu.loss.beta, tulu.optimizer.lr) == ("dpo_norm", 5.0, 5e-7)
    assert (tulu.scheduler.type, tulu.scheduler.warmup_ratio, tulu.training.epochs) == ("linear", 0.1, 1)
    assert (tulu.data.max_length, tulu.training.global_batch_size) == (2048, 128)
    assert tulu.data.train[0].path == "allenai/llama-3.1-tulu-3-8b-preference-mixture"
    simpo = load_config(REPO / "recipes" / "simpo_llama3_8b_instruct.toml", over)
    assert (simpo.loss.type, simpo.loss.beta, simpo.loss.gamma_beta_ratio) == ("simpo", 10.0, 0.3)
    assert (simpo.optimizer.lr, simpo.scheduler.type, simpo.training.global_batch_size) == (
        1e-6,
        "cosine",
        128,
    )
    wpo = load_config(REPO / "recipes" / "wpo_8b.toml", over)
    assert (wpo.loss.type, wpo.loss.beta, wpo.optimizer.lr, wpo.training.epochs) == ("wpo", 0.01, 1e-6, 2)
    lora = load_config(REPO / "recipes" / "lora_8b_dpo.toml", over)
    assert lora.lora.enabled and (lora.lora.r, lora.lora.alpha, lora.optimizer.lr) == (128, 128.0, 5e-6)
    big = load_config(REPO / "recipes" / "multinode_70b_dpo.toml", over)
    assert (big.parallel.sharding, big.parallel.cpu_offload, big.parallel.activation_checkpointing) == (
        "hybrid",
        False,
        "full",
    )
    assert (big.loss.type, big.loss.beta, big.optimizer.lr) == ("dpo_norm", 5.0, 2e-7)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_dry_runs(
    recipe: Path,
    tmp_path: Path,
    small_data: dict,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a dry run loads no weights and starts no process group
    def forbidden(*args, **kwargs):
        raise AssertionError("a dry run must not load weights or start torch.distributed")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(dist, "init_process_group", forbidden)
    argv = [str(recipe), *_overrides(recipe, tmp_path, small_data["train"])]
    if recipe.name not in DEMOS:
        argv += _world(recipe)
    argv.append("--dry-run")
    assert torchrun_train.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "# resolved recipe" in out and "accumulation steps" in out
    assert "# estimated memory per rank" in out, out[-2000:]
    assert "total" in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_tulu3_on_8_ranks_hand_computed(tmp_path: Path) -> None:
    """Full sharding over 8 ranks, bf16 compute, activation checkpointing of all 32 blocks:

    parameters  4 B x 8,030,261,248 / 8                    = 4,015,130,624
    gradients   the same (every parameter is trained)       = 4,015,130,624
    optimizer   8 B x 8,030,261,248 / 8                     = 8,030,261,248
    gathered    2 B x (output unit 525,340,672 + 2 x 218,112,000)
                + 6 B x 525,340,672                               = 5,075,173,376
                (the output unit, final norm + LM head, the larger edge unit, stays gathered
                from forward to backward; two blocks gathered; the output unit's unsharded
                gradients in bf16 plus their fp32 reduce-scatter copy, larger than a block's)
    activations tokens = 2 x micro 1 x 2048 = 4096; a block keeps 8h + 4i = 90,112 values per
                token, a checkpointed one h = 4096:
                2 B x 4096 x (32 x 4096 + 90,112)              = 1,811,939,328
    head chunk  1024 tokens x 128256 x (2 + 8) B               = 1,313,341,440
    """
    cfg = load_config(REPO / "recipes" / "tulu3_8b_dpo_norm.toml", [f"model.path={LLAMA3_8B}"])
    plan = plan_run(cfg, AutoConfig.from_pretrained(LLAMA3_8B), world_size=8, ranks_per_node=8)
    assert plan.batches.accumulation_steps == 16 and plan.batches.pairs_per_rank == 16
    assert plan.mesh == ((8,), ("shard",))
    size = plan.size
    assert (size.parameters, size.trainable, size.largest_block, size.root) == (
        L8_TOTAL,
        L8_TOTAL,
        L8_BLOCK,
        L8_ROOT,
    )
    assert (size.blocks, size.hidden_size, size.intermediate_size, size.vocab_size) == (
        32,
        4096,
        14336,
        128256,
    )
    m = plan.memory
    assert m.compute_dtype == "bf16" and m.shard_size == 8
    assert m.get("parameters") == 4 * L8_TOTAL // 8 == 4_015_130_624
    assert m.get("gradients") == 4_015_130_624
    assert m.get("optimizer") == 8_030_261_248
    output_unit = 128256 * 4096 + 4096  # lm_head + final norm
    assert size.output_unit == output_unit and size.input_unit == 128256 * 4096
    assert m.get("gathered") == 2 * (output_unit + 2 * L8_BLOCK) + 6 * output_unit == 5_075_173_376
    assert m.get("activations") == 2 * 4096 * (32 * 4096 + 90_112) == 1_811_939_328
    assert m.get("head_chunk") == 1024 * 128256 * 10 == 1_313_341_440
    assert m.device_total == sum(
        [4_015_130_624, 4_015_130_624, 8_030_261_248, 5_075_173_376, 1_811_939_328, 1_313_341_440]
    )


def test_70b_hybrid_on_4_nodes_of_8(tmp_path: Path) -> None:
    """HSDP with 2 replicas of 16-rank shard groups: state = 16 B x 70,553,706,496 / 16."""
    cfg = load_config(REPO / "recipes" / "multinode_70b_dpo.toml", [f"model.path={LLAMA31_70B}"])
    plan = plan_run(cfg, AutoConfig.from_pretrained(LLAMA31_70B), world_size=32, ranks_per_node=8)
    assert plan.mesh == ((2, 16), ("replicate", "shard"))
    assert plan.batches.accumulation_steps == 4
    assert (plan.size.parameters, plan.size.largest_block, plan.size.blocks) == (L70_TOTAL, L70_BLOCK, 80)
    m = plan.memory
    assert m.get("parameters") == 4 * L70_TOTAL // 16 == 17_638_426_624
    assert m.get("optimizer") == 8 * L70_TOTAL // 16
    # one shard group per node instead: the state is split over 8 ranks only
    cfg.parallel.replicate_degree = 0
    assert mesh_shape(cfg.parallel, 32, 8) == ((4, 8), ("replicate", "shard"))
    per_node = estimate_memory(cfg, plan.size, 32, 8)
    assert per_node.get("parameters") == 4 * L70_TOTAL // 8
    assert math.isclose(per_node.device_total / m.device_total, 1.8, rel_tol=0.1)


def test_70b_long_context_variant_splits_each_row_over_a_node() -> None:
    """multinode_70b_dpo_32k: data 4 x sequence 8 on 32 ranks; a rank holds 8192 positions of a
    2 x 32768-token row: activations 8192 x 2 B x (80 checkpointed blocks x 8192 + 1 recomputed
    block's 8h + 4i = 180,224); the state is the base recipe's."""
    over = [f"model.path={LLAMA31_70B}"]
    cfg = load_config(REPO / "recipes" / "multinode_70b_dpo_32k.toml", over)
    base = load_config(REPO / "recipes" / "multinode_70b_dpo.toml", over)
    assert (cfg.loss, cfg.optimizer, cfg.scheduler) == (base.loss, base.optimizer, base.scheduler)
    plan = plan_run(cfg, AutoConfig.from_pretrained(LLAMA31_70B), world_size=32, ranks_per_node=8)
    assert (plan.batches.world_size, plan.batches.accumulation_steps) == (4, 32)
    m, b = plan.memory, plan_run(base, AutoConfig.from_pretrained(LLAMA31_70B), 32, 8).memory
    assert m.get("activations") == 8192 * 2 * (80 * 8192 + 180_224)
    assert m.get("parameters") == b.get("parameters") and m.get("optimizer") == b.get("optimizer")
    assert plan.fits[2] >= 8192  # within an H200 less the reserve


def test_lora_counts_only_adapters_as_trained() -> None:
    """r = 128 on q, k, v, o, gate, up, down of Llama-3-8B: r x (in + out) per adapted linear:
    q, o 128 x 8192 = 1,048,576 each; k, v 128 x 5120 = 655,360 each; gate, up, down
    128 x 18432 = 2,359,296 each: 10,485,760 per block, x 32 = 335,544,320."""
    cfg = load_config(REPO / "recipes" / "lora_8b_dpo.toml", [f"model.path={LLAMA3_8B}"])
    size = measure_model(AutoConfig.from_pretrained(LLAMA3_8B), cfg.lora)
    assert size.trainable == 335_544_320
    assert size.parameters == L8_TOTAL + 335_544_320
    m = estimate_memory(cfg, size, world_size=8, ranks_per_node=8)
    assert m.get("parameters") == 4 * size.parameters // 8  # the frozen base is sharded too
    assert m.get("gradients") == 4 * 335_544_320 // 8
    assert m.get("optimizer") == 8 * 335_544_320 // 8


def test_sharding_strategies_divide_state_as_documented() -> None:
    cfg = load_config(REPO / "recipes" / "tulu3_8b_dpo_norm.toml", [f"model.path={LLAMA3_8B}"])
    size = measure_model(AutoConfig.from_pretrained(LLAMA3_8B), cfg.lora)
    by = {}
    for sharding in ("full", "grad_op", "hybrid", "none"):
        cfg.parallel.sharding = sharding
        by[sharding] = estimate_memory(cfg, size, world_size=16, ranks_per_node=8)
    assert by["full"].get("optimizer") == 8 * L8_TOTAL // 16
    assert by["grad_op"].get("optimizer") == 8 * L8_TOTAL // 16
    assert by["hybrid"].get("optimizer") == 8 * L8_TOTAL // 8  # shard group = one node
    assert by["none"].get("optimizer") == 8 * L8_TOTAL  # replicated
    # nothing freed after forward; a block's gradients unsharded in bf16 + their fp32 reduce copy
    assert by["grad_op"].get("gathered") == 2 * L8_TOTAL + 6 * L8_BLOCK
    # none accumulates unsynchronised gradients: they are unsharded anyway
    assert by["none"].get("gradients") == 4 * L8_TOTAL
    # without activation checkpointing every block keeps 8h + 4i values per token
    cfg.parallel.sharding, cfg.parallel.activation_checkpointing = "full", "none"
    no_ac = estimate_memory(cfg, size, world_size=8, ranks_per_node=8)
    assert no_ac.get("activations") == 2 * 4096 * 32 * 90_112
    # fp32 compute (CPU) doubles the gathered parameters; the gradients need no separate fp32 copy
    output_unit = size.output_unit
    assert by["full"].get("gathered") == 2 * (output_unit + 2 * L8_BLOCK) + 6 * output_unit
    cfg.parallel.mixed_precision = "fp32"
    assert (
        estimate_memory(cfg, size, 8, 8).get("gathered") == 4 * (output_unit + 2 * L8_BLOCK) + 4 * output_unit
    )
    # a bf16 reduce-scatter needs no fp32 copy either
    cfg.parallel.mixed_precision, cfg.parallel.reduce_dtype = "auto", "bf16"
    assert (
        estimate_memory(cfg, size, 8, 8).get("gathered") == 2 * (output_unit + 2 * L8_BLOCK) + 2 * output_unit
    )
    cfg.parallel.mixed_precision, cfg.parallel.reduce_dtype = "fp32", "fp32"
    # a token budget sets the activations' tokens per forward
    cfg.parallel.mixed_precision, cfg.training.forward_mode, cfg.training.micro_batch_tokens = (
        "bf16",
        "packed",
        16384,
    )
    assert estimate_memory(cfg, size, 8, 8).get("activations") == 2 * 16384 * 32 * 90_112


def test_batch_arithmetic_and_mesh_errors() -> None:
    from engine.errors import UserError

    cfg = load_config(REPO / "recipes" / "tulu3_8b_dpo_norm.toml", [f"model.path={LLAMA3_8B}"])
    assert plan_batches(cfg.training, 1).accumulation_steps == 128
    assert plan_batches(cfg.training, 128).accumulation_steps == 1
    with pytest.raises(UserError, match=r"global_batch_size=128 must be a multiple of .* 3 ranks"):
        plan_batches(cfg.training, 3)
    with pytest.raises(UserError, match=r"global_batch_size=128 .* 256 ranks"):
        plan_batches(cfg.training, 256)
    cfg.training.forward_mode, cfg.training.micro_batch_tokens = "packed", 8192
    assert plan_batches(cfg.training, 8).accumulation_steps == 0  # varies by step
    with pytest.raises(UserError, match=r"global_batch_size=128 must be a multiple of the 3 ranks"):
        plan_batches(cfg.training, 3)
    cfg.parallel.sharding, cfg.parallel.replicate_degree = "hybrid", 3
    with pytest.raises(UserError, match="replicate_degree=3 must divide the 8 ranks"):
        mesh_shape(cfg.parallel, 8, 8)
    cfg.parallel.sharding, cfg.parallel.replicate_degree = "none", 0
    assert mesh_shape(cfg.parallel, 8, 8) == ((8, 1), ("replicate", "shard"))


def test_hub_model_offline_prints_a_note_and_still_plans(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    recipe = REPO / "recipes" / "tulu3_8b_dpo_norm.toml"
    assert (
        torchrun_train.main([str(recipe), f"job.output_dir={tmp_path}", "--dry-run", "--world-size=8"]) == 0
    )
    out = capsys.readouterr().out
    assert "accumulation steps   16 = 128 / (1 x 8 ranks)" in out
    assert "hub data set, split 'train'" in out
    assert "note: the memory estimate needs the model config" in out
    assert "# estimated memory" not in out


def test_dry_run_from_the_command_line(tmp_path: Path) -> None:
    """The real entry point in a fresh process: 70B on 4 nodes x 8, the plan on stdout."""
    recipe = REPO / "recipes" / "multinode_70b_dpo.toml"
    model = _model_folder(LLAMA31_70B, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "torchrun_train.py"), str(recipe), f"model.path={model}",
         "--dry-run", "--world-size", "32", "--ranks-per-node", "8", "job.output_dir=/nonexistent/fsdpo-dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**env, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "ranks                32 (8 per node, 4 nodes)" in proc.stdout
    assert "hybrid: mesh (2, 16) (replicate x shard)" in proc.stdout
    assert "70.55B parameters" in proc.stdout
