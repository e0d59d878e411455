"""The output folder: fsdpo replaces or deletes only files it wrote (its manifest), `job.overwrite` or not."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.run_dir import MANIFEST, RUN_PATHS, RunDir, check_output_dir
from tests.conftest import REPO, base_tables, read_metrics, run_training, write_recipe

# ---------------------------------------------------------------------------------------------
# RunDir on its own


def test_remove_deletes_only_recorded_files_and_keeps_foreign_ones(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / "final" / "sub").mkdir(parents=True)
    ours = [tmp_path / "final" / "model.safetensors", tmp_path / "final" / "sub" / "a.json"]
    for p in ours:
        p.write_text("x")
    run.record(tmp_path / "final")
    (tmp_path / "final" / "README.md").write_text("my card")
    assert run.foreign_files() == [tmp_path / "final" / "README.md"]
    with pytest.raises(UserError, match=r"final/README\.md was not written by fsdpo"):
        run.check_replaceable(tmp_path / "final", "the export")
    run.remove(tmp_path / "final")
    assert not any(p.exists() for p in ours) and not (tmp_path / "final" / "sub").exists()
    assert (tmp_path / "final" / "README.md").read_text() == "my card"
    # the manifest survives a new process and forgot the removed files
    assert RunDir(tmp_path).files == set()


def test_claimed_staging_folder_is_removed_whole_and_published_files_are_owned(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    staging, final = tmp_path / "checkpoints" / ".step-2.incomplete", tmp_path / "checkpoints" / "step-2"
    run.claim(staging)
    (staging / "rng").mkdir(parents=True)
    (staging / "rng" / "rank-1.pt").write_text("written by another rank")
    assert run.foreign_files() == []  # a claimed folder is ours whole
    run.publish(staging, final)
    assert not staging.exists() and (final / "rng" / "rank-1.pt").is_file()
    reloaded = RunDir(tmp_path)
    assert reloaded.files == {"checkpoints/step-2/rng/rank-1.pt"} and reloaded.folders == set()
    run.claim(staging)
    (staging / "half-written").mkdir(parents=True)
    run.remove(staging)
    assert not staging.exists()


def test_only_the_main_rank_changes_anything(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    RunDir(tmp_path).record(tmp_path / "metrics.jsonl")
    other = RunDir(tmp_path, is_main=False)
    other.remove(tmp_path / "metrics.jsonl")
    other.claim(tmp_path / "final.incomplete")
    assert (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"files": ["metrics.jsonl"], "folders": []}


def test_a_corrupt_manifest_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match=f"{MANIFEST} is unreadable"):
        RunDir(tmp_path)


@pytest.mark.parametrize("name", [n for n in RUN_PATHS if n not in ("final", "checkpoints")])
def test_a_foreign_file_at_any_run_path_is_refused_overwrite_or_not(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("mine")
    for overwrite, resuming in ((True, False), (False, True), (False, False)):
        with pytest.raises(UserError, match=f"{name} was not written by fsdpo"):
            check_output_dir(tmp_path, overwrite, resuming)
    assert (tmp_path / name).read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Real runs


def _train(recipe: Path, overrides: list[str], world) -> None:
    from engine.recipe import load_config
    from engine.trainer import Trainer

    Trainer(load_config(recipe, overrides), world).train()


@pytest.fixture(scope="module")
def previous_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict, world
) -> Path:
    """A finished 2-step run with checkpoints (in this process), to run again over."""
    out = tmp_path_factory.mktemp("previous") / "run"
    tables = base_tables(tiny_model_dir, small_data, out)
    tables["training"]["max_steps"] = 2
    tables["checkpoint"] = {"interval_steps": 1}
    recipe = write_recipe(out.parent / "r.toml", tables)
    _train(recipe, [], world)
    return recipe


def _copy_of(previous_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(previous_run.parent / "run", out)
    return out


FOREIGN_PLACES = [
    "final/README.md",
    "checkpoints/notes.txt",
    "checkpoints/step-1/mine.txt",
    "checkpoints/step-7/model.bin",
]


@pytest.mark.parametrize("place", FOREIGN_PLACES)
@pytest.mark.parametrize("resume", ["auto", "never"])
def test_overwrite_refuses_foreign_files_in_every_run_subfolder(
    previous_run: Path, tmp_path: Path, place: str, resume: str, world
) -> None:
    out = _copy_of(previous_run, tmp_path)
    foreign = out / place
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_text("the user's")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    overrides = [f"job.output_dir={out}", "job.overwrite=true", f"checkpoint.resume={resume}"]
    with pytest.raises(UserError, match=f"{re.escape(str(foreign))} was not written by fsdpo"):
        _train(previous_run, overrides, world)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing changed


def test_overwrite_replaces_the_previous_run_and_keeps_files_outside_it(
    previous_run: Path, tmp_path: Path, world
) -> None:
    out = _copy_of(previous_run, tmp_path)
    keep = {
        out / "notes.txt": "my notes",
        out / "reference" / "mine.txt": "mine",
        out / "eval" / "x.json": "{}",
    }
    for path, text in keep.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    overrides = [
        "job.overwrite=true",
        "checkpoint.resume=never",
        "training.max_steps=1",
        "checkpoint.interval_steps=0",
    ]
    _train(previous_run, [f"job.output_dir={out}", *overrides], world)
    assert all(path.read_text() == text for path, text in keep.items())
    assert not (out / "checkpoints").exists()  # the previous run's checkpoints were its own files
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1]
    manifest = RunDir(out)
    assert manifest.foreign_files() == [] and "final/model.safetensors" in manifest.files
    assert not any(f.startswith("checkpoints/") for f in manifest.files)


def test_checkpoint_retention_removes_its_own_checkpoints_from_disk_and_manifest(
    previous_run: Path, tmp_path: Path, world
) -> None:
    out = tmp_path / "run"
    _train(previous_run, [f"job.output_dir={out}", "training.max_steps=3", "checkpoint.keep_last=1"], world)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    owned = {f.split("/")[1] for f in RunDir(out).files if f.startswith("checkpoints/")}
    assert owned == {"step-3"}


@pytest.mark.slow
def test_the_issue_repro_under_torchrun_keeps_the_users_card(tmp_path: Path) -> None:
    """mkdir -p mine/final && echo card > mine/final/README.md && torchrun --nproc_per_node 2
    torchrun_train.py recipes/demo.toml job.output_dir=mine training.max_steps=2 (job.overwrite=true),
    its 2 ranks forked with torchrun's environment (tests/forked.py): the rule is the run's, not
    the launcher's."""
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "final" / "README.md").write_text("card\n")
    overrides = [f"job.output_dir={out}", "training.max_steps=2", "job.overwrite=true"]
    proc = run_training(REPO / "recipes" / "demo.toml", overrides, nproc=2, forked=True)
    assert proc.returncode != 0
    assert f"{out / 'final' / 'README.md'} was not written by fsdpo" in proc.stderr
    assert sorted(p.name for p in out.rglob("*")) == ["README.md", "final"]
    assert (out / "final" / "README.md").read_text() == "card\n"


def test_no_shipped_recipe_sets_overwrite() -> None:
    import tomllib

    for recipe in sorted((REPO / "recipes").glob("*.toml")):
        raw = tomllib.loads(recipe.read_text())
        assert "overwrite" not in raw.get("job", {}), (
            f"{recipe} sets job.overwrite; recipes extending it inherit it"
        )
