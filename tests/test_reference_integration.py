"""The reference cache inside real runs: exactness at step 0, reuse, refusal, other world sizes."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from engine.data import collate
from engine.forward import policy_logps
from engine.recipe import load_config
from engine.trainer import Trainer
from tests.conftest import (
    LN2,
    base_tables,
    main_in_process,
    run_sweep,
    sweep_stdout,
    train_rows,
    write_recipe,
)


def _trainer(tmp_path: Path, name: str, model_dir: Path, data: dict, cache: Path, overrides=(), world=None):
    tables = base_tables(model_dir, data, tmp_path / name)
    recipe = write_recipe(tmp_path / f"{name}.toml", tables)
    cfg = load_config(recipe, [f"reference.cache_dir={cache}", "export.enabled=false", *overrides])
    return Trainer(cfg, world)


@pytest.mark.parametrize("mode", ["concatenated", "packed", "prefix_shared"])
def test_step0_policy_equals_cached_reference_exactly(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, mode: str
) -> None:
    """Same batch composition (one pair per forward) gives bitwise-equal log-probs on CPU: the
    reference is scored with the training layout when that is padding-free."""
    trainer = _trainer(
        tmp_path, "run", tiny_model_dir, small_data, tmp_path / "cache",
        ["training.micro_batch_size=1", "reference.batch_size=1", f"training.forward_mode={mode}"], world,
    )  # fmt: skip
    ref = trainer.train_reference
    with torch.no_grad():
        for i in range(len(trainer.train_data)):
            logps = policy_logps(
                mode, trainer.model, collate(trainer.train_data, [i]), trainer.pad_id, world.device
            )
            assert torch.equal(logps.chosen_logps, ref.chosen[i : i + 1])
            assert torch.equal(logps.rejected_logps, ref.rejected[i : i + 1])
    trainer.train()
    assert abs(train_rows(tmp_path / "run")[0]["loss"] - LN2) < 1e-6


def test_second_run_reuses_the_cache_and_reproduces_the_curve(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    cache = tmp_path / "cache"
    first = _trainer(tmp_path, "first", tiny_model_dir, small_data, cache, world=world)
    assert first.references.forwards == 2  # train and eval
    first.train()
    second = _trainer(tmp_path, "second", tiny_model_dir, small_data, cache, world=world)
    assert second.references.forwards == 0
    assert torch.equal(second.train_reference.chosen, first.train_reference.chosen)
    assert torch.equal(second.eval_reference.rejected, first.eval_reference.rejected)
    second.train()
    assert train_rows(tmp_path / "first") and [r["loss"] for r in train_rows(tmp_path / "first")] == [
        r["loss"] for r in train_rows(tmp_path / "second")
    ]


def test_every_change_of_key_builds_a_new_cache_beside_the_old(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    data = {k: tmp_path / Path(v).name for k, v in small_data.items()}
    for k, v in small_data.items():
        shutil.copy(v, data[k])
    cache = tmp_path / "cache"

    def forwards(name: str, overrides=()) -> int:
        return _trainer(tmp_path, name, model_dir, data, cache, overrides, world).references.forwards

    assert forwards("base") == 2
    assert forwards("again") == 0
    # a weight changed in place in the model folder (same file size)
    weights = load_file(model_dir / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 0.5
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert forwards("weights") == 2
    # the tokenizer's chat template
    template = model_dir / "chat_template.jinja"
    template.write_text(template.read_text() + "{# revised #}")
    assert forwards("template") == 2
    # one pair of the training data (the eval cache stays valid)
    lines = data["train"].read_text().splitlines()
    lines[3] = lines[3].replace('"content": "', '"content": "please ', 1)
    data["train"].write_text("\n".join(lines) + "\n")
    assert forwards("data") == 1
    # max_length
    assert forwards("length", ["data.max_length=40"]) == 2
    files = sorted(cache.glob("reference-*.safetensors"))
    assert len(files) == 2 + 2 + 2 + 1 + 2  # every key side by side, none overwritten
    # a corrupted file is reported and rebuilt
    newest = max(files, key=lambda f: f.stat().st_mtime_ns)
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    capsys.readouterr()
    assert forwards("corrupt", ["data.max_length=40"]) == 1
    assert "is corrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_cache_built_on_two_ranks_serves_one_rank_and_back(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "unused")
    tables["training"]["micro_batch_size"] = 2
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r.toml", tables)

    def overrides(cache: str) -> list[str]:
        return [f"reference.cache_dir={tmp_path / cache}"]

    def losses(out: Path) -> list[float]:
        return [r["loss"] for r in train_rows(out)]

    def one_rank(name: str, cache: str) -> tuple[list[float], str]:
        """A run on 1 rank: the one rank of this process."""
        proc = main_in_process(recipe, [f"job.output_dir={tmp_path / name}", *overrides(cache)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return losses(tmp_path / name), proc.stdout

    # y built on one rank first, so that one two-rank launch builds x and reads y
    built1, log_c = one_rank("c", "y")
    two = tmp_path / "two"
    run_sweep(recipe, two, {"a": overrides("x"), "d": overrides("y")}, nproc=2)
    built2, reused2 = losses(two / "a"), losses(two / "d")
    logs = sweep_stdout(two)
    log_a, log_d = logs["a"], logs["d"]
    reused1, log_b = one_rank("b", "x")
    assert "cached in" in log_a and "loaded" in log_b and "cached in" in log_c and "loaded" in log_d
    assert "pairs in" not in log_b and "pairs in" not in log_d  # no reference forward at all
    for x, y in ((reused1, built1), (reused2, built2), (built1, built2)):
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(x, y)), (x, y)


def test_build_reference_only_refuses_a_loss_without_a_reference(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    proc = main_in_process(recipe, ["--build-reference-only", "loss.type=simpo"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("fsdpo:")]
    assert "loss.type ['simpo']: --build-reference-only has nothing to cache" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_build_reference_only_then_train(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    proc = main_in_process(recipe, ["--build-reference-only", "export.enabled=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "reference").glob("reference-*.safetensors"))) == 2
    assert not (out / "metrics.jsonl").exists()  # nothing but the cache was written
    proc = main_in_process(recipe, ["export.enabled=false"])
    assert proc.returncode == 0 and proc.stdout.count("reference log-probs (train): loaded") == 1
    assert proc.stdout.count("reference log-probs (eval): loaded") == 1
