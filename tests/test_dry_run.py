"""The dry run makes the real run's input checks with the real run's functions: what a real run
rejects before training, `--dry-run` rejects with the same line, reading only the first rows of
each data source and loading no weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import torchrun_train
from engine.plan import SAMPLE_ROWS
from tests.conftest import base_tables, write_recipe


def _rows(data: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in data.read_text().splitlines()[:n]]


def _renamed(rows: list[dict]) -> list[dict]:
    """The pairs with `chosen`/`rejected` under other names (as many hub data sets have them)."""
    return [{"prompt": r["prompt"], "better": r["chosen"], "worse": r["rejected"]} for r in rows]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def main(world, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """torchrun_train.main in this process (the process group kept between calls): (exit code,
    the error line or None, stdout)."""
    import engine.distributed

    monkeypatch.setattr(engine.distributed, "shutdown", lambda: None)

    def run(argv: list[str]) -> tuple[int, str | None, str]:
        capsys.readouterr()
        code = torchrun_train.main(argv)
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("fsdpo: error: ")]
        assert len(errors) <= 1, errors
        return code, errors[0] if errors else None, out

    return run


def _case(name: str, tmp: Path, model: Path, data: dict, setup) -> tuple[Path, list[str]]:
    tables = base_tables(model, data, tmp / "out")
    tables["data"]["eval"] = []
    overrides = setup(tmp, tables)
    return write_recipe(tmp / f"{name}.toml", tables), overrides


def _json_columns(tmp: Path, tables: dict) -> list[str]:
    tables["data"]["train"] = [
        str(_jsonl(tmp / "renamed.jsonl", _renamed(_rows(Path(tables["data"]["train"][0]), 16))))
    ]
    return []


def _json_columns_skipped(tmp: Path, tables: dict) -> list[str]:
    _json_columns(tmp, tables)
    return ["data.on_bad_row=skip"]


def _parquet_columns(tmp: Path, tables: dict) -> list[str]:
    rows = _renamed(_rows(Path(tables["data"]["train"][0]), 16))
    pq.write_table(pa.Table.from_pylist(rows), tmp / "renamed.parquet")
    tables["data"]["train"] = [str(tmp / "renamed.parquet")]
    return []


def _no_tokenizer(tmp: Path, tables: dict) -> list[str]:
    model = tmp / "model"
    shutil.copytree(
        tables["model"]["path"], model, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*")
    )
    tables["model"]["path"] = str(model)
    return []


def _typo_path(tmp: Path, tables: dict) -> list[str]:
    (tmp / "models").mkdir()
    shutil.copytree(tables["model"]["path"], tmp / "models" / "tiny-llama")
    tables["model"]["path"] = "models/tiny-lama"  # relative to the working folder, misspelt
    return []


def _batch(tmp: Path, tables: dict) -> list[str]:
    return ["training.micro_batch_size=3"]


CASES = {
    "json-columns": (_json_columns, ["data.train[0]", "row 0 (line 1)", "missing column 'chosen'"]),
    "json-columns-skipped": (_json_columns_skipped, ["no pair left after filtering", "bad_row: 16"]),
    "parquet-columns": (_parquet_columns, ["no column 'chosen'", "columns: prompt, better, worse", "data.columns"]),
    "no-tokenizer": (_no_tokenizer, ["model.path", "holds no tokenizer files", "tokenizer.json"]),
    "typo-path": (_typo_path, ["model.path", "models/tiny-lama not found"]),
    "batch": (_batch, ["training.global_batch_size=8", "training.micro_batch_size=3 x 1 ranks"]),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_dry_run_rejects_what_the_real_run_rejects_with_the_same_line(
    case: str, main, tmp_path: Path, tiny_model_dir: Path, small_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, words = CASES[case]
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working folder
    recipe, overrides = _case(case, tmp_path, tiny_model_dir, small_data, setup)
    real = main([str(recipe), *overrides])[:2]
    dry = main([str(recipe), *overrides, "--dry-run"])[:2]
    assert real[0] == 2 and dry[0] == 2, (real, dry)
    assert dry[1] == real[1], (dry[1], real[1])
    for word in words:
        assert word in dry[1], (word, dry[1])
    assert not (tmp_path / "out").exists()


def test_dry_run_tokenises_only_the_first_rows(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, monkeypatch: pytest.MonkeyPatch, main
) -> None:
    """A bad row past the sample passes the dry run (the real run reports it); at most
    SAMPLE_ROWS rows of each source are tokenised, and the sample's filter counts are printed."""
    from engine.data import tokenize

    rows = _rows(small_data["train"], 64) * 2
    rows[100] = {"prompt": "p", "chosen": "c"}
    data = _jsonl(tmp_path / "long.jsonl", rows)
    tables = base_tables(tiny_model_dir, {"train": data, "eval": small_data["eval"]}, tmp_path / "out")
    recipe = write_recipe(tmp_path / "long.toml", tables)
    tokenised = []
    real_tokenize = tokenize.tokenize_rows

    def counting(batch, indices, **kwargs):
        tokenised.append(len(indices))
        return real_tokenize(batch, indices, **kwargs)

    monkeypatch.setattr(tokenize, "tokenize_rows", counting)
    code, error, out = main([str(recipe), "--dry-run"])
    assert code == 0, error
    assert tokenised == [SAMPLE_ROWS, 12], tokenised  # train: the first rows; eval: all 12
    assert f"long.jsonl: 1 json file(s), 0.0 MiB; first {SAMPLE_ROWS} rows: {SAMPLE_ROWS} kept" in out
    assert "eval.jsonl: 1 json file(s), 0.0 MiB; all 12 rows: 12 kept" in out
    monkeypatch.setattr(tokenize, "tokenize_rows", real_tokenize)
    code, error, _ = main([str(recipe)])
    assert code == 2 and "row 100 (line 101): missing column 'rejected'" in error, error


def test_a_sample_with_no_usable_pair_is_a_note_when_more_rows_follow(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, main
) -> None:
    """Under on_bad_row = "skip" a later row may still give pairs: the dry run says what it saw
    and leaves the verdict to the real run."""
    data = _jsonl(tmp_path / "renamed.jsonl", _renamed(_rows(small_data["train"], 64) * 2))
    tables = base_tables(tiny_model_dir, {"train": data, "eval": small_data["eval"]}, tmp_path / "out")
    tables["data"].update(eval=[], on_bad_row="skip")
    code, error, out = main([str(write_recipe(tmp_path / "r.toml", tables)), "--dry-run"])
    assert code == 0, error
    assert f"first {SAMPLE_ROWS} rows: 0 kept (dropped: bad_row {SAMPLE_ROWS})" in out
    assert (
        f"note: data.train[0] ({data}): none of the first {SAMPLE_ROWS} rows gives a pair (row 0 (line 1): "
        "missing column 'chosen'"
    ) in out
