"""Model FLOPs, the MFU peak and the training row's throughput columns (engine.metrics)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from engine import metrics
from engine.config import LoraConfig
from engine.forward import FORWARD_MODES, Work, forward_work
from engine.metrics import ModelShape, model_flops, model_shape
from engine.recipe import load_config
from tests.conftest import ASSETS, base_tables, train_rows, write_recipe

# (prompt, chosen, rejected) tokens of the 2-pair batch of the hand computation
PAIRS = [(3, 2, 4), (5, 1, 2)]


def _meta_model(**config_overrides) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama", **config_overrides)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_model_shape_of_the_tiny_llama_by_hand() -> None:
    """hidden 64, 2 layers, 4 query heads and 2 KV heads of 16, MLP 176, vocab 416, untied.
    Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288, gate/up/down 3 x 64 x 176 = 33792,
    two norms 128: 46208; two layers + the final norm (64): 92480 non-embedding parameters.
    LM head 416 x 64 = 26624. Tied: the head is the embedding, counted once, as the head."""
    shape = model_shape(_meta_model())
    assert shape == ModelShape(
        body=92480, body_trained=92480, head=26624, head_trained=26624, layers=2, attention_width=64
    )
    tied = model_shape(_meta_model(tie_word_embeddings=True))
    assert (tied.body, tied.head, tied.head_trained) == (92480, 26624, 26624)


def test_model_shape_counts_lora_and_routed_experts() -> None:
    """LoRA r=4 on q_proj and v_proj: per layer q adds 4 x (64 + 64) = 512, v 4 x (64 + 32) = 384,
    so 2 x 896 = 1792 trained; the base and the head are frozen. A Mixtral of 4 experts, 2 per
    token (hidden 32, MLP 64, 4 heads of 8, 2 KV heads): per layer attention 1024 + 512 + 512 +
    1024 = 3072, router 4 x 32 = 128, experts (4 x 128 x 32 + 4 x 32 x 64) x 2/4 = 12288, norms
    64: 15552; two layers + the final norm 32 = 31136."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from engine.model import apply_lora

    torch.manual_seed(0)
    base = _meta_model().to_empty(device="cpu")
    lora = apply_lora(base, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    shape = model_shape(lora)
    assert (shape.body, shape.body_trained, shape.head_trained) == (92480 + 1792, 1792, 0)

    moe = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    with torch.device("meta"):
        shape = model_shape(AutoModelForCausalLM.from_config(moe))
    assert (shape.body, shape.head, shape.attention_width) == (31136, 3200, 32)


# positions computed, attention pairs, scored positions of PAIRS, by hand:
# sequences prompt+chosen 5, 6; prompt+rejected 7, 7 (25 real tokens); scored 2+4+1+2 = 9;
# causal triangles n(n+1)/2: 15 + 21 + 28 + 28 = 92
HAND = {
    "concatenated": (4 * 7, 92),  # 4 rows as wide as the longest (7)
    "separate": (2 * 6 + 2 * 7, 92),  # chosen rows of 6, rejected rows of 7
    "packed": (25, 92),
    # [3 | 2 | 4][5 | 1 | 2]: 17 positions, each prompt once. Prompt+chosen: 15 and 21 pairs;
    # rejected: 4 queries see the 3 prompt keys and themselves causally, 4 x 3 + 10 = 22;
    # 2 queries see 5 prompt keys, 2 x 5 + 3 = 13: 15 + 22 + 21 + 13 = 71
    "prefix_shared": (17, 71),
}


@pytest.mark.parametrize("mode", list(HAND))
def test_flops_of_a_two_pair_batch_by_hand(mode: str) -> None:
    """Tiny Llama, fully trained: 6 x 92480 = 554880 FLOPs per position computed, 12 x 2 layers
    x 64 = 1536 per (query, key) pair attended, 6 x 26624 = 159744 per scored position:
    concatenated 28 x 554880 + 92 x 1536 + 9 x 159744 = 17115648; separate 26 positions:
    16005888; packed 25: 15451008; prefix_shared 17 positions and 71 pairs: 10979712."""
    expected = {
        "concatenated": 17115648,
        "separate": 16005888,
        "packed": 15451008,
        "prefix_shared": 10979712,
    }
    positions, pairs = HAND[mode]
    work = forward_work(mode, PAIRS)
    assert (work.positions, work.attention_pairs, work.scored, work.real_positions) == (
        positions,
        pairs,
        9,
        17 if mode == "prefix_shared" else 25,
    )
    assert model_flops(model_shape(_meta_model()), work) == expected[mode]


@pytest.mark.parametrize("mode", list(FORWARD_MODES))
def test_forward_work_is_what_the_layouts_compute(mode: str) -> None:
    """The arithmetic from pair lengths equals the model inputs engine.forward builds."""
    from engine.bench.common import pair_batch

    g = torch.Generator().manual_seed(1)
    pairs = [
        tuple(
            torch.randint(3, 50, (n,), generator=g).tolist() for n in torch.randint(1, 30, (3,), generator=g)
        )
        for _ in range(5)
    ]
    batch = pair_batch(pairs, list(range(len(pairs))))
    built = Work()
    for inputs in FORWARD_MODES[mode].layout(batch, 0, torch.device("cpu")):
        if inputs.segments is not None:
            pairs_attended = inputs.segments.visible_pairs()
        else:
            n = inputs.attention_mask.sum(1)
            pairs_attended = int((n * (n + 1) // 2).sum())
        built += Work(
            inputs.computed_tokens,
            inputs.real_tokens,
            pairs_attended,
            inputs.score_positions.numel(),
            [inputs.computed_tokens],
        )
    assert forward_work(mode, [[len(x) for x in pair] for pair in pairs]) == built


def test_peak_table_matches_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = torch.bfloat16
    assert metrics.table_peak("NVIDIA H100 80GB HBM3", bf16) == 989e12
    assert metrics.table_peak("NVIDIA H100 PCIe", bf16) == 756e12
    assert metrics.table_peak("NVIDIA H100 NVL", torch.float16) == 835e12
    assert metrics.table_peak("NVIDIA H200", bf16) == 989e12
    assert metrics.table_peak("NVIDIA GH200 480GB", bf16) == 989e12
    assert metrics.table_peak("NVIDIA A100-SXM4-80GB", bf16) == 312e12
    assert (
        metrics.table_peak("NVIDIA L40S", bf16) == 362e12 and metrics.table_peak("NVIDIA L4", bf16) == 121e12
    )
    assert metrics.table_peak("NVIDIA B200", bf16) == 2250e12
    assert metrics.table_peak("NVIDIA H100 80GB HBM3", torch.float32) == 67e12  # no TF32
    assert metrics.table_peak("NVIDIA B200", torch.float32) is None
    assert metrics.table_peak("NVIDIA A10G", bf16) is None  # not the A10
    assert metrics.table_peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb", bf16) is None  # a slice

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peak = metrics.device_peak(cuda, bf16, (700e12, "bfloat16"))
    assert (peak.flops, peak.measured) == (989e12, 700e12)
    assert "device table" in peak.why and "measured matmul 700 TFLOP/s" in peak.why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX PRO 6000")
    peak = metrics.device_peak(cuda, bf16, (300e12, "bfloat16"))
    assert peak.flops == 300e12 and "not in the device table" in peak.why
    peak = metrics.device_peak(cpu, bf16, (4e11, "float32, faster than bfloat16 on this CPU"))
    assert peak.flops == 4e11 and peak.why == "measured matmul, float32, faster than bfloat16 on this CPU"


def test_a_launcher_hands_down_its_measured_matmul_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDPO_MATMUL_PEAK (tests/conftest.py's launches): the rate of this device type and dtype
    is taken as measured, without a probe; another dtype is measured as without it."""
    measured: list[torch.dtype] = []
    monkeypatch.setattr(metrics, "_MEASURED_PEAKS", {})
    monkeypatch.setattr(
        metrics, "measure_matmul_flops", lambda device, dtype, size=2048: measured.append(dtype) or 3e9
    )
    monkeypatch.setenv(metrics.MATMUL_PEAK_ENV, "cuda:float32=5e13,cpu:float32=6.5e10")
    cpu = torch.device("cpu")
    assert metrics.matmul_peak_once(cpu, torch.float32) == (6.5e10, "float32") and measured == []
    assert metrics.matmul_peak_once(cpu, torch.bfloat16) == (3e9, "bfloat16")
    assert measured == [torch.bfloat16, torch.float32]  # bf16 on CPU is also bounded by fp32
    monkeypatch.delenv(metrics.MATMUL_PEAK_ENV)
    assert metrics.handed_down_peak(cpu, torch.float32) is None


SLEEP = 0.4


def test_training_rows_count_the_model_inputs_and_leave_out_eval_and_checkpoints(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefix_shared, 4 steps of 2 micro-batches, a row every 2 steps, evaluation after every
    step and a checkpoint after step 3, each slowed by SLEEP s: every row's window holds such a
    pause. The row's FLOPs and positions are those of the inputs the model was called with
    (recorded by a hook), and its window is the steps' own time."""
    from engine import trainer as trainer_module

    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, dtype, size=2048: 1e11)
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "run")
    tables["data"]["train"] = [{"path": str(small_data["train"]), "count": 16}]
    tables["data"]["eval"] = [{"path": str(small_data["eval"]), "count": 4}]
    tables["training"].update(
        global_batch_size=4,
        micro_batch_size=2,
        max_steps=4,
        forward_mode="prefix_shared",
        eval_interval_steps=1,
    )
    tables.update(logging={"interval_steps": 2}, checkpoint={"interval_steps": 3}, export={"enabled": False})
    trainer = trainer_module.Trainer(load_config(write_recipe(tmp_path / "r.toml", tables)), world)
    assert trainer.meter.peak.flops == 1e11
    assert trainer.meter.shape == model_shape(_meta_model())  # the hand-counted shape, sharded

    steps: list[dict] = []  # per training step: its duration and the inputs of its forwards

    def record(module, args, kwargs) -> None:
        if torch.is_grad_enabled():
            steps[-1]["inputs"].append(kwargs)

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    train_step = trainer.train_step

    def timed_step(step, window):
        steps.append({"inputs": []})
        start = time.perf_counter()
        out = train_step(step, window)
        steps[-1]["seconds"] = time.perf_counter() - start
        return out

    def slowed(f):
        def call(*args, **kwargs):
            time.sleep(SLEEP)
            return f(*args, **kwargs)

        return call

    monkeypatch.setattr(trainer, "train_step", timed_step)
    monkeypatch.setattr(trainer, "evaluate", slowed(trainer.evaluate))
    monkeypatch.setattr(trainer.checkpoints, "save", slowed(trainer.checkpoints.save))
    trainer.train()
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4]

    shape = model_shape(trainer.model.causal_lm)
    for row, window in zip(rows, (steps[0:2], steps[2:4])):
        inputs = [k for s in window for k in s["inputs"]]
        assert len(inputs) == 4  # 2 micro-batches per step, one forward each
        positions = sum(k["input_ids"].numel() for k in inputs)
        work = Work(
            positions=positions,
            attention_pairs=sum(k["segments"].visible_pairs() for k in inputs),
            scored=sum(k["score_positions"].numel() for k in inputs),
        )
        elapsed = positions / row["positions_per_s"]
        assert math.isclose(row["mfu"], model_flops(shape, work) / elapsed / 1e11, rel_tol=1e-9)
        # real pair tokens count the prompt twice, the positions computed once
        prompts = sum(k["input_ids"].numel() - k["score_positions"].numel() for k in inputs)
        assert math.isclose(row["tokens_per_s"] / row["positions_per_s"], (positions + prompts) / positions)
        steps_time = sum(s["seconds"] for s in window)
        assert steps_time <= elapsed < steps_time + 0.75 * SLEEP, (elapsed, steps_time)


def test_dry_run_plans_the_model_flops_of_a_step(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict
) -> None:
    """8 pairs per step, micro-batches of 8, concatenated, the tiny Llama. Sampled pairs PAIRS
    (one micro-batch of both): 17115648 FLOPs per 2 pairs, 68462592 per step. No sample, max_length
    64: a 1-token prompt and two 63-token completions: 2 rows of 64, 2 x 64 x 65 / 2 = 4160 pairs
    attended, 126 scored: 128 x 554880 + 4160 x 1536 + 126 x 159744 = 97542144 per pair,
    780337152 per step."""
    import numpy as np
    from transformers import AutoConfig

    from engine.plan import dry_run, plan_run

    cfg = load_config(
        write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, tmp_path / "o"))
    )
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert plan_run(cfg, config, 1, 1, np.array(PAIRS)).flops[0] == 68462592
    flops, how = plan_run(cfg, config, 1, 1).flops
    assert flops == 780337152 and "data.max_length=64" in how
    line = next(x for x in dry_run(cfg).splitlines() if x.startswith("model FLOPs per step"))
    assert "concatenated, 64 sampled training pairs" in line, line
