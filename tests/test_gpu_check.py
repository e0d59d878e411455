"""The GPU check (engine/bench/gpu_check.py) runs whole at its tiny size on CPU, through the bench's
`--gpu-check` flag: every phase writes its file with the documented keys and sane values, a
failing phase is recorded and the next one runs, a spent time cap skips what is left. The compile
phase (tens of seconds of C++ builds on CPU) has its own slow test."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from engine.bench import cli, gpu_check
from engine.errors import UserError
from engine.forward import FORWARD_MODES

LN2 = math.log(2)
TINY = gpu_check.SIZES["tiny"]


def run_check(out: Path, *flags: str) -> dict:
    """The check at its tiny size through the bench's command line, on one thread (the CI box's
    two cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["--gpu-check", str(out), "--gpu-check-size", "tiny", *flags])
    finally:
        torch.set_num_threads(threads)


def read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu-check")
    return out, run_check(out)


def test_every_phase_writes_its_file(checked) -> None:
    out, summary = checked
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in gpu_check.PHASES:
        record = read(out, name)
        assert record["phase"] == name and record["size"] == "tiny"
        assert summary["phases"][name]["status"] == record["status"]
        if name == "compile":  # on CPU only when --gpu-check-phases names it (test below)
            assert record["status"] == "skipped" and "--gpu-check-phases" in record["reason"]
            continue
        assert record["status"] == "ok", record.get("traceback") or record
        assert "error" not in record and 0 < record["seconds"] <= record["budget_s"]
        assert record["headline"] == summary["phases"][name]["headline"]


def test_environment(checked) -> None:
    env = read(checked[0], "environment")
    assert env["versions"]["torch"] == torch.__version__
    rates = env["matmul_bf16"]["flops"]
    assert set(rates) == {f"{n}^3" for n in TINY.matmul_sizes} and min(rates.values()) > 0
    # on CPU there is no table peak: the measured rate is the peak
    assert env["matmul_bf16"]["table_peak"] is None and env["matmul_bf16"]["best_over_peak"] == 1.0
    assert env["matmul_bf16"]["peak_source"].startswith("measured matmul")
    assert env["kernels"]["engine_available"] == ["sdpa_loop"]
    assert env["kernels"]["plan_throughput_model"] == {"full_attention": "sdpa_loop"}
    assert env["sdpa_backends"]["math"] == {"causal_gqa": "ok", "masked_bottom_right": "ok"}


def test_numerics(checked) -> None:
    num = read(checked[0], "numerics")
    assert num["fp32_modes_agree"] is True
    assert set(num["fp32_modes"]) == set(FORWARD_MODES)
    assert all(m["max_rel_diff"] <= 1e-5 for m in num["fp32_modes"].values())
    assert num["fp32_modes"]["concatenated"]["max_rel_diff"] == 0
    assert num["logit_std"]["after"] == pytest.approx(6.0, rel=0.05)
    # every completion token is scored once per mode (prefix sharing's shared prompt end included)
    pairs = TINY.numerics_pairs.make(416, 42)
    completions = sum(len(c) + len(r) for _, c, r in pairs)
    for mode, delta in num["bf16_vs_fp32"].items():
        assert delta["tokens"] == completions, mode
        for part in ("per_token", "per_sequence_sum"):
            d = delta[part]
            assert all(math.isfinite(v) for v in d.values()), (mode, part)
            assert 0 < d["mean_abs"] <= d["p99_abs"] <= d["max_abs"] < 5, (mode, part)  # bf16 rounds
    for mode in FORWARD_MODES:
        fp32, bf16 = num["step0"]["fp32"][mode], num["step0"]["bf16"][mode]
        # the policy is the reference at step 0: a DPO loss of ln 2 up to rounding
        assert abs(fp32["ln2_minus_loss"]) < 1e-5 and fp32["max_abs_logratio"] < 1e-3, mode
        assert fp32["loss"] == pytest.approx(LN2 - fp32["ln2_minus_loss"], abs=1e-12)
        assert math.isfinite(bf16["ln2_minus_loss"]) and 0 <= bf16["accuracy"] <= 1, mode


def test_attention(checked) -> None:
    att = read(checked[0], "attention")
    assert att["kernels"] == ["sdpa_loop"] and att["tokens"] == TINY.attention_tokens
    for row in ("packed", "prefix_shared"):
        info = att["rows"][row]
        assert sum(info["query_lengths"]) == TINY.attention_tokens
        # the dense mask built from the lengths sees exactly the pairs the segments count
        assert info["mask_pairs"] == info["pairs_attended"]
        result = info["sdpa_loop"]
        assert result["served_by"] == "sdpa_loop"
        for part in ("output", "dq", "dk", "dv"):
            assert result[part]["max_rel"] < 1e-5, (row, part)  # fp32 against fp32
        assert result["forward_ms"] > 0 and result["forward_backward_ms"] > 0
    shared = att["rows"]["prefix_shared"]
    # rejected blocks (every second one) have fewer queries than keys: bottom-right causal
    assert all(q < k for q, k in zip(shared["query_lengths"][1::2], shared["key_lengths"][1::2]))
    assert len(att["rows"]["packed"]["query_lengths"]) == TINY.attention_sequences


def test_throughput(checked) -> None:
    out = checked[0]
    tp = read(out, "throughput")
    runs = tp["runs"]
    assert [(r["mode"], r["activation_checkpointing"]) for r in runs] == list(TINY.runs)
    for r in runs:
        assert "error" not in r, r.get("traceback")
        assert 0 < r["mfu"] <= 1 and r["tokens_per_s"] > 0 and r["peak_allocated_gib"] > 0, r["mode"]
        assert r["peak_reserved_gib"] is None  # CUDA only
        assert r["estimate_gib"] == pytest.approx(sum(r["estimate_items_gib"].values()))
        # MFU is the model FLOPs over the step time and the peak (one timed step)
        assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_times_s"][0] / tp["peak_flops"])
        assert r["attention_kernels"] == {"full_attention": "sdpa_loop"}
    by_mode = {r["mode"]: r for r in runs}
    assert by_mode["packed@192"]["padding_fraction"] == 0 < by_mode["concatenated"]["padding_fraction"]
    table = (out / "summary.md").read_text()
    assert all(f"| {r['mode']} | {r['activation_checkpointing']} |" in table for r in runs)


def test_syncs_on_cpu(checked) -> None:
    """On CPU the value reads of one step are counted; the step's one wait (engine/step.py: the
    all-reduced flags, read once) is among them."""
    syncs = read(checked[0], "syncs")
    assert syncs["counted"].startswith("value reads")
    assert syncs["per_step_by_site"]["tolist engine/step.py:__call__"] == 1
    assert syncs["per_step"] == sum(syncs["per_step_by_site"].values())
    assert syncs["build_warmup_and_one_step"] > syncs["per_step"]


def test_a_failing_phase_is_recorded_and_the_next_runs(tmp_path: Path, monkeypatch) -> None:
    def broken(check, record):
        record["partly"] = "done"
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(gpu_check.PHASE_FUNCTIONS, "environment", broken)
    summary = run_check(tmp_path, "--gpu-check-phases", "attention,environment")
    env = read(tmp_path, "environment")
    assert env["status"] == "error" and env["error"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in env["traceback"] and "broken" in env["traceback"]
    assert env["partly"] == "done"  # what the phase had recorded is kept
    assert read(tmp_path, "attention")["status"] == "ok"
    assert read(tmp_path, "numerics")["status"] == "skipped"
    assert summary["phases"]["environment"]["error"] == env["error"]


def test_a_spent_time_cap_skips_the_items_left(tmp_path: Path, monkeypatch) -> None:
    capped = dataclasses.replace(TINY, budgets_s={**TINY.budgets_s, "attention": 0})
    monkeypatch.setitem(gpu_check.SIZES, "tiny", capped)
    run_check(tmp_path, "--gpu-check-phases", "environment,attention")  # the total stays open
    att = read(tmp_path, "attention")
    assert att["status"] == "ok"
    assert all(row["sdpa_loop"] == {"skipped": "phase time cap"} for row in att["rows"].values())


def test_unknown_phase_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--gpu-check-phases: unknown phase 'speed'"):
        run_check(tmp_path, "--gpu-check-phases", "speed")


def test_compile_phase(tmp_path: Path, monkeypatch) -> None:
    """parallel.compile off and on for the packed mode: both step, dynamo traces each block as
    one graph (no break, no recompile) and the stats are this run's. Blocks compile with the
    `eager` backend here (dynamo's tracing, no code generation): Inductor's C++ builds of the tiny
    model take 40-140 s on a loaded 2-core box, aot_eager ~35 s (the whole path, Inductor
    included, runs on CPU with `python -m engine.bench --gpu-check OUT --gpu-check-phases compile`)."""
    compile_block = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_block(self, backend="eager", **kw)
    )
    run_check(tmp_path, "--gpu-check-phases", "compile")
    comp = read(tmp_path, "compile")
    assert comp["status"] == "ok", comp.get("traceback")
    assert comp["eager"]["compile"] is False and comp["compiled"]["compile"] is True
    assert comp["speedup"] > 0 and 0 < comp["compiled"]["mfu"] <= 1
    assert comp["speedup"] == pytest.approx(comp["eager"]["step_time_s"] / comp["compiled"]["step_time_s"])
    stats = comp["compile_stats"]
    assert stats["graphs"] == 1 and stats["compile_s"] > 0, stats
    assert stats["graph_breaks"] == 0 and stats["recompiles"] == 0 and comp["graph_break_reasons"] == {}
