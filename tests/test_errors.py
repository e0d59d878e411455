"""The error catalogue: every mistake a user can make exits 2 with one clear line and loses nothing.

Each case is a bad input across recipe, data, model folder, checkpoint, output folder and caches.
It runs `torchrun_train.main` in this process (one rank on the in-process store; the process
group is kept between cases, as the `world` fixture keeps it), by default against an output
folder holding a previous run (two steps, checkpoints step-1 and step-2, final/) copied for the
case. The test asserts: exit code 2, exactly one line on stderr (a finished progress bar aside),
`fsdpo: error: ` followed by the key/file/row and what is expected, no traceback, and the output
folder (and the model and data the run read) byte-identical before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import torchrun_train
from engine.reference_cache import MEMO_FILE
from tests.conftest import REPO, base_tables, write_recipe


@dataclass
class Env:
    """What every case starts from."""

    model: Path  # a saved tiny Llama (weights, config, tokenizer)
    train: Path  # 64 good pairs
    previous: Path  # output folder of a finished 2-step run with checkpoints step-1, step-2
    cache: Path  # tokenisation cache shared by the cases (keeps them fast)
    tables: dict  # the recipe of the previous run


@dataclass
class Case:
    id: str
    what: str  # the mistake, in words
    words: list[str]  # what the one line must contain
    make: Callable[[Env, Path], list[str]]  # -> argv after the recipe (overrides, flags)
    # job.output_dir: "previous" (a copy of the previous run), "none" (does not exist yet), "file" (a
    # file, not a folder) or "foreign" (a folder of the user's own files, one named `checkpoints`)
    output: str = "previous"
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    unchanged: tuple[str, ...] = ()  # parts of the output folder that must not change (default: all)
    tables: Callable[[dict, Env, Path], None] | None = None  # edit the recipe's tables


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _rows(env: Env, n: int = 16) -> list[dict]:
    return [json.loads(line) for line in env.train.read_text().splitlines()[:n]]


def _data_file(tmp: Path, rows: list, name: str = "bad.jsonl") -> Path:
    return _write(tmp / name, "".join(json.dumps(r) + "\n" for r in rows))


def _copy_model(env: Env, tmp: Path, drop: tuple[str, ...] = ()) -> Path:
    folder = tmp / "model"
    shutil.copytree(env.model, folder, ignore=shutil.ignore_patterns(*drop))
    return folder


def _newest_checkpoint(out: Path) -> Path:
    return out / "checkpoints" / "step-2"


def _enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint.filesystem as dcp_files

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_files, "_write_item", full_disk)


PROGRESS_BAR = re.compile(r"\d+%\|.*\|")

CASES = [
    # --- recipe --------------------------------------------------------------------------------
    Case("typo-key", "misspelt key", ["optimizer.lrr", 'did you mean "optimizer.lr"'], lambda e, t: ["optimizer.lrr=1e-6"]),
    Case("typo-table", "misspelt table", ["trainig.epochs", 'did you mean "training"'],
         lambda e, t: ["trainig.epochs=2"]),
    Case("wrong-type", "a string where an integer goes", ["training.max_steps", "integer"],
         lambda e, t: ["training.max_steps=two"]),
    Case("out-of-range", "beta must be positive", ["loss.beta", "> 0"], lambda e, t: ["loss.beta=0"]),
    Case("peer-key", "TRL's name for a key", ["learning_rate", 'did you mean "optimizer.lr"'],
         lambda e, t: ["learning_rate=1e-6"]),
    Case("peer-loss", "TRL's name for a loss", ["loss.type", 'TRL\'s "sigmoid" is fsdpo\'s "dpo"'],
         lambda e, t: ["loss.type=sigmoid"]),
    Case("unknown-loss", "a loss name that does not exist", ["loss.type", 'did you mean "dpo"'],
         lambda e, t: ["loss.type=dpoo"]),
    Case("conflict", "warmup given twice", ["scheduler.warmup_steps", "scheduler.warmup_ratio"],
         lambda e, t: ["scheduler.warmup_ratio=0.1"]),
    Case("bad-toml", "a recipe that is not TOML", ["not valid TOML"],
         lambda e, t: [],
         tables=lambda tb, e, t: tb.setdefault("__raw__", "[model\npath = 1\n")),
    Case("missing-extends", "extends names a missing file", ["extends", "not found"],
         lambda e, t: [], tables=lambda tb, e, t: tb.setdefault("__extends__", "nope.toml")),
    Case("unknown-flag", "a misspelt flag", ["--dry-rnu", 'did you mean "--dry-run"'], lambda e, t: ["--dry-rnu"]),
    Case("world-size-real-run", "--world-size without --dry-run", ["--world-size", "only with --dry-run"],
         lambda e, t: ["--world-size", "2"]),
    Case("world-size-not-int", "--world-size x", ["--world-size", "integer"],
         lambda e, t: ["--dry-run", "--world-size", "x"]),
    # --- batch arithmetic ----------------------------------------------------------------------
    Case("batch-dry-run", "8 pairs do not split over 3 ranks", ["training.global_batch_size=8", "3 ranks"],
         lambda e, t: ["--dry-run", "--world-size", "3"], output="none"),
    Case("batch-real-run", "8 pairs are not micro-batches of 3", ["training.global_batch_size=8",
         "training.micro_batch_size=3"], lambda e, t: ["training.micro_batch_size=3"]),
    Case("batch-larger-than-data", "a global batch larger than the data", ["training.global_batch_size=128",
         "64 training pairs"], lambda e, t: ["training.global_batch_size=128", "training.micro_batch_size=8"],
         output="none"),
    Case("token-budget-padded-mode", "a token budget with the padded concatenated forward",
         ["training.micro_batch_tokens", "packed or prefix_shared", "'concatenated'"],
         lambda e, t: ["training.micro_batch_tokens=4096"]),
    Case("token-budget-too-small", "a token budget below the longest pair", ["training.micro_batch_tokens=8",
         "longest pair", "data.max_length"],
         lambda e, t: ["training.forward_mode=packed", "training.micro_batch_tokens=8"]),
    Case("hybrid-replicas", "3 replica groups on 4 ranks", ["parallel.replicate_degree=3", "4 ranks"],
         lambda e, t: ["--dry-run", "--world-size", "4", "training.micro_batch_size=2", "parallel.sharding=hybrid",
                       "parallel.replicate_degree=3"]),
    Case("ranks-per-node", "3 ranks per node on 8 ranks", ["--ranks-per-node=3", "--world-size=8"],
         lambda e, t: ["--dry-run", "--world-size", "8", "--ranks-per-node", "3"]),
    # --- data ----------------------------------------------------------------------------------
    Case("data-missing", "a data file that does not exist", ["data.train[0]", "nope.jsonl", "not found"],
         lambda e, t: [f"data.train=[\"{t / 'nope.jsonl'}\"]"]),
    Case("data-missing-dry-run", "the same, found by --dry-run", ["data.train[0]", "nope.jsonl", "not found"],
         lambda e, t: ["--dry-run", f"data.train=[\"{t / 'nope.jsonl'}\"]"]),
    Case("data-extension", "a .csv file", ["data.train[0]", ".jsonl"],
         lambda e, t: [f"data.train=[\"{_write(t / 'pairs.csv', 'a,b')}\"]"]),
    Case("data-empty", "an empty data file", ["data.train[0]", "no rows"],
         lambda e, t: [f"data.train=[\"{_write(t / 'empty.jsonl', '')}\"]"]),
    Case("data-bad-json", "a line that is not JSON", ["data.train[0]", "row 3"],
         lambda e, t: [f"data.train=[\"{_write(t / 'bad.jsonl', ''.join(json.dumps(r) + chr(10) for r in _rows(e, 3)) + '{oops' + chr(10))}\"]"]),
    Case("data-missing-column", "a row without `rejected`", ["data.train[0]", "row 2", "rejected"],
         lambda e, t: [f"data.train=[\"{_data_file(t, [*_rows(e, 2), {'prompt': 'p', 'chosen': 'c'}])}\"]"]),
    Case("data-wrong-type", "a number where text goes", ["data.train[0]", "row 1", "chosen"],
         lambda e, t: [f"data.train=[\"{_data_file(t, [_rows(e, 1)[0], {'prompt': 'p', 'chosen': 7, 'rejected': 'r'}])}\"]"]),
    Case("data-bad-count", "count = 0", ["data.train[0].count", "-1 or > 0"],
         lambda e, t: [f"data.train=[{{ path = \"{e.train}\", count = 0 }}]"]),
    Case("chat-template-missing", "a chat template file that does not exist", ["data.chat_template", "nope.jinja"],
         lambda e, t: [f"data.chat_template={t / 'nope.jinja'}"]),
    # --- model folder --------------------------------------------------------------------------
    Case("model-missing", "a model folder that does not exist", ["model.path", "not found"],
         lambda e, t: [f"model.path={t / 'no-model'}"]),
    Case("model-missing-dry-run", "the same, found by --dry-run", ["model.path", "not found"],
         lambda e, t: ["--dry-run", f"model.path={t / 'no-model'}"]),
    Case("model-empty", "an empty folder", ["model.path", "holds no config.json"],
         lambda e, t: [f"model.path={_write(t / 'empty-model' / '.keep', '').parent}"]),
    Case("model-no-weights", "config and tokenizer but no weights", ["model.path", "cannot load model weights"],
         lambda e, t: [f"model.path={_copy_model(e, t, drop=('*.safetensors',))}"]),
    Case("model-corrupt-weights", "a truncated safetensors file", ["model.path", "cannot read the safetensors"],
         lambda e, t: [f"model.path={_truncate(_copy_model(e, t) / 'model.safetensors')}"]),
    Case("model-corrupt-config", "config.json that is not JSON", ["model.path", "config"],
         lambda e, t: ["--dry-run", f"model.path={_corrupt_config(_copy_model(e, t))}"]),
    Case("model-is-a-file", "model.path names a file", ["model.path", "not a folder"],
         lambda e, t: ["--dry-run", f"model.path={_write(t / 'model.bin', 'x')}"]),
    Case("lora-bad-target", "LoRA on a module the model does not have", ["lora.target_modules"],
         lambda e, t: ["lora.enabled=true", 'lora.target_modules=["qq_proj"]'], output="none"),
    # --- output folder and checkpoints ---------------------------------------------------------
    Case("output-holds-run", "a finished run in job.output_dir, resume never", ["job.output_dir",
         "already holds a run", "job.overwrite=true"], lambda e, t: ["checkpoint.resume=never"]),
    Case("output-holds-run-dry-run", "the same, found by --dry-run", ["job.output_dir", "already holds a run"],
         lambda e, t: ["--dry-run", "checkpoint.resume=never"]),
    Case("output-is-a-file", "job.output_dir is a file", ["job.output_dir", "not a folder"],
         lambda e, t: [], output="file"),
    Case("output-foreign-checkpoints", "the user's own file named `checkpoints` in job.output_dir",
         ["job.output_dir", "checkpoints was not written by fsdpo"], lambda e, t: [], output="foreign"),
    Case("resume-missing", "checkpoint.resume names no folder", ["checkpoint.resume", "not found"],
         lambda e, t: [f"checkpoint.resume={t / 'step-9'}"]),
    Case("resume-not-checkpoint", "checkpoint.resume names a folder that is no checkpoint",
         ["checkpoint.resume", "not a complete fsdpo checkpoint"],
         lambda e, t: [f"checkpoint.resume={_write(t / 'step-3' / 'notes.txt', 'x').parent}"]),
    Case("resume-corrupt-state", "the newest checkpoint's trainer_state.json is truncated",
         ["checkpoint.resume", "step-2/trainer_state.json", "corrupt"],
         lambda e, t: _corrupt_state(t)),
    Case("resume-corrupt-state-dry-run", "the same, found by --dry-run",
         ["checkpoint.resume", "step-2/trainer_state.json", "corrupt"],
         lambda e, t: ["--dry-run", *_corrupt_state(t)]),
    Case("resume-corrupt-shards", "the newest checkpoint's DCP metadata is garbage",
         ["checkpoint.resume", "cannot load", "step-2", "metadata"], lambda e, t: _corrupt_metadata(t)),
    Case("resume-other-batch", "resume with another global batch size", ["training.global_batch_size",
         "16"], lambda e, t: ["training.global_batch_size=16", "training.micro_batch_size=16"]),
    Case("disk-full", "no space left while saving a checkpoint", ["checkpoint: cannot write", "step-3",
         "No space left on device"], lambda e, t: ["training.max_steps=3"], patch=_enospc,
         unchanged=("checkpoints", "final")),
    # --- caches --------------------------------------------------------------------------------
    Case("data-cache-is-file", "data.cache_dir names a file", ["data.cache_dir"],
         lambda e, t: [f"data.cache_dir={_write(t / 'cache.txt', 'x')}", f"data.train=[\"{_data_file(t, _rows(e, 16))}\"]"]),
    Case("data-cache-is-file-dry-run", "the same, found by --dry-run", ["data.cache_dir", "not a folder"],
         lambda e, t: ["--dry-run", f"data.cache_dir={_write(t / 'cache.txt', 'x')}"]),
    Case("reference-cache-is-file-dry-run", "reference.cache_dir names a file, found by --dry-run",
         ["reference.cache_dir", "not a folder"],
         lambda e, t: ["--dry-run", f"reference.cache_dir={_write(t / 'ref.txt', 'x')}"]),
    Case("reference-cache-is-file", "reference.cache_dir names a file", ["reference.cache_dir"],
         lambda e, t: [f"reference.cache_dir={_write(t / 'ref.txt', 'x')}"], output="none"),
]  # fmt: skip


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path.parent


def _corrupt_config(folder: Path) -> Path:
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return folder


# the case's output folder is `tmp / "run"` (see test below): corrupt its newest checkpoint
def _corrupt_state(tmp: Path) -> list[str]:
    (_newest_checkpoint(tmp / "run") / "trainer_state.json").write_text('{"step": 2, "consumed')
    return []


def _corrupt_metadata(tmp: Path) -> list[str]:
    (_newest_checkpoint(tmp / "run") / ".metadata").write_bytes(b"not a pickle")
    return []


MEMOS = {MEMO_FILE}  # the reference cache's memo of data-file hashes: rewritten freely


def _snapshot(path: Path) -> object:
    """Every file's sha256 and every folder under `path` (None if it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(path.rglob("*"))
        if p.name not in MEMOS
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Env:
    root = tmp_path_factory.mktemp("errors")
    tables = base_tables(tiny_model_dir, small_data, root / "previous")
    tables["data"].update(eval=[], cache_dir=str(root / "cache"))
    tables["training"].update(max_steps=2)
    tables["checkpoint"] = {"interval_steps": 1}
    recipe = write_recipe(root / "previous.toml", tables)
    with pytest.MonkeyPatch.context() as mp:
        _keep_process_group(mp)
        assert torchrun_train.main([str(recipe)]) == 0
    previous = root / "previous"
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["step-1", "step-2"]
    return Env(tiny_model_dir, Path(small_data["train"]), previous, root / "cache", tables)


def _keep_process_group(mp: pytest.MonkeyPatch) -> None:
    """main() destroys the process group at exit; in this process later tests still need it."""
    import engine.distributed

    mp.setattr(engine.distributed, "shutdown", lambda: None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line_and_keeps_outputs(
    case: Case, env: Env, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _keep_process_group(monkeypatch)
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    if case.output == "previous":
        shutil.copytree(env.previous, out)
    elif case.output == "file":
        _write(out, "my notes")
    elif case.output == "foreign":
        _write(out / "checkpoints", "my notes")
        _write(out / "notes.md", "more notes")
    tables = json.loads(json.dumps(env.tables))
    tables["job"]["output_dir"] = str(out)
    extends = None
    raw = None
    if case.tables:
        case.tables(tables, env, tmp_path)
        extends = tables.pop("__extends__", None)
        raw = tables.pop("__raw__", None)
    recipe = write_recipe(tmp_path / "recipe.toml", tables, extends=extends)
    if raw is not None:
        recipe.write_text(raw)
    argv = [str(recipe), *case.make(env, tmp_path)]
    watched = [*(out / part for part in case.unchanged or [""]), env.previous, env.model, env.train]
    before = [_snapshot(p) for p in watched]
    if case.patch:
        case.patch(monkeypatch)
    capsys.readouterr()

    code = torchrun_train.main(argv)
    err = capsys.readouterr().err
    # a progress bar that finished before the error (tokenising) is not an error line
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("fsdpo: error: "), lines[0]
    print(f"{case.id}: {lines[0]}")
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    after = [_snapshot(p) for p in watched]
    assert after == before, f"{case.what}: the output folder changed on an error path"


def test_a_foreign_error_is_quoted_by_its_first_line_or_its_type() -> None:
    """One rule (engine.errors.first_line) for quoting a library's or the OS's exception inside a
    UserError; the checkpoint's copy (`str(e).splitlines()[0]`) failed on an empty message."""
    from engine.errors import did_you_mean, first_line

    assert first_line(ValueError("\n  bad header \nmore detail")) == "bad header"
    assert first_line(OSError()) == "OSError"
    assert did_you_mean("packd", ["concatenated", "packed"]) == ' (did you mean "packed"?)'
    assert did_you_mean("zzz", ["concatenated", "packed"]) == ""
