"""Data sources, mixtures, the tokenisation cache, the held-out split and rank-0-first building."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine.data.tokenize
from engine.config import DataConfig, DataSource
from engine.data import build_dataset, split_eval
from engine.errors import UserError
from tests.forked import forkserver
from tests.test_data_formats import CHATML, msg, word_tokenizer

ROWS = [
    {"prompt": [msg("user", f"sort {a} {b}")], "chosen": f"{min(a, b)} {max(a, b)}", "rejected": f"{max(a, b)} {min(a, b)}"}
    for a, b in [(3, 1), (2, 9), (4, 1), (9, 3), (1, 2), (4, 9), (3, 2), (9, 1), (2, 4), (3, 4)]
]  # fmt: skip
STANDARD = [
    {"prompt": f"sort {a} {b}", "chosen": f" {a} {b}", "rejected": f" {b} {a}"}
    for a, b in [(1, 2), (3, 4), (1, 9)]
]


@pytest.fixture
def tokenizer():
    return word_tokenizer()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows passed to the tokenising function, one entry per `datasets.map` batch."""
    seen: list[int] = []
    real = engine.data.tokenize.tokenize_rows

    def counting(batch, indices, **kwargs):
        seen.append(len(indices))
        return real(batch, indices, **kwargs)

    monkeypatch.setattr(engine.data.tokenize, "tokenize_rows", counting)
    return seen


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(tmp_path: Path, **settings) -> DataConfig:
    return DataConfig(
        max_length=settings.pop("max_length", 64), cache_dir=str(tmp_path / "cache"), **settings
    )


def contents(data) -> list[tuple]:
    return [(tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in data.pairs]


# ----------------------------------------------------------------------------------------------
# Sources


def test_parquet_folders_and_json_arrays_read_like_jsonl(tmp_path: Path, tokenizer) -> None:
    reference = contents(
        build_dataset([DataSource(str(write_jsonl(tmp_path / "a.jsonl", ROWS)))], tokenizer, cfg(tmp_path), 0)
    )
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=1))
    write_jsonl(tmp_path / "jsonl" / "part-0.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "jsonl" / "sub" / "part-1.jsonl", ROWS[4:])
    (tmp_path / "jsonl" / ".hidden.jsonl").write_text("not read\n")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:6]), tmp_path / "pq" / "0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[6:]), tmp_path / "pq" / "1.parquet")
    for path in ("a.parquet", "a.json", "jsonl", "pq"):
        data = build_dataset([DataSource(str(tmp_path / path))], tokenizer, cfg(tmp_path), 0)
        assert contents(data) == reference, path


def test_rows_in_folders_are_located_by_file_row_and_line(tmp_path: Path, tokenizer) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:3])
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"\(.*d\): b.jsonl: row 1 \(line 3\): missing column 'chosen'"):
        build_dataset([DataSource(str(tmp_path / "d"))], tokenizer, cfg(tmp_path), 0)
    pq.write_table(pa.Table.from_pylist([ROWS[0], {**ROWS[1], "rejected": None}]), tmp_path / "p.parquet")
    with pytest.raises(
        UserError, match=r"p.parquet\): row 1: rejected: expected a list of messages, got null"
    ):
        build_dataset([DataSource(str(tmp_path / "p.parquet"))], tokenizer, cfg(tmp_path, format="auto"), 0)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path, tokenizer) -> None:
    reference = contents(
        build_dataset([DataSource(str(write_jsonl(tmp_path / "a.jsonl", ROWS)))], tokenizer, cfg(tmp_path), 0)
    )
    # other columns are ignored; Arrow fills absent message keys with nulls, which are dropped
    extra = [{**r, "score": 1.0, "prompt": [{**m, "name": None} for m in r["prompt"]]} for r in ROWS]
    datasets.Dataset.from_list(extra).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_list(extra),
            "test_prefs": datasets.Dataset.from_list(extra[:2]),
        }
    ).save_to_disk(tmp_path / "saved_dict")
    assert (
        contents(build_dataset([DataSource(str(tmp_path / "saved"))], tokenizer, cfg(tmp_path), 0))
        == reference
    )
    source = DataSource(str(tmp_path / "saved_dict"), split="train_prefs")
    assert contents(build_dataset([source], tokenizer, cfg(tmp_path), 0)) == reference
    with pytest.raises(UserError, match=r"no split 'train' \(splits: train_prefs, test_prefs\)"):
        build_dataset([DataSource(str(tmp_path / "saved_dict"))], tokenizer, cfg(tmp_path), 0)
    renamed = datasets.Dataset.from_list(
        [{"question": r["prompt"], "a": r["chosen"], "b": r["rejected"]} for r in ROWS]
    )
    renamed.save_to_disk(tmp_path / "renamed")
    with pytest.raises(
        UserError, match=r"no column 'chosen' \(columns: question, a, b; name yours with data.columns"
    ):
        build_dataset([DataSource(str(tmp_path / "renamed"))], tokenizer, cfg(tmp_path), 0)
    source = DataSource(
        str(tmp_path / "renamed"), columns={"prompt": "question", "chosen": "a", "rejected": "b"}
    )
    assert contents(build_dataset([source], tokenizer, cfg(tmp_path), 0)) == reference


def test_hub_id_goes_through_load_dataset(tmp_path: Path, tokenizer, calls, monkeypatch) -> None:
    """A path that is no local file or folder is a hub id: `datasets.load_dataset` with the
    source's subset, split and revision (served from the local cache when offline)."""
    requests = []
    hub = datasets.Dataset.from_list(ROWS)

    def load_dataset(path, **kwargs):
        requests.append((path, kwargs))
        return hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = DataSource("org/prefs", subset="clean", split="train_prefs", revision="v1.0")
    data = build_dataset([source], tokenizer, cfg(tmp_path), 0)
    assert requests == [("org/prefs", {"name": "clean", "split": "train_prefs", "revision": "v1.0"})]
    assert len(data) == len(ROWS) and sum(calls) == len(ROWS)
    build_dataset([DataSource("org/prefs")], tokenizer, cfg(tmp_path), 0)  # defaults
    assert requests[-1] == ("org/prefs", {"name": None, "split": "train", "revision": None})
    # a second run re-loads (to learn the fingerprint) but does not re-tokenise
    calls.clear()
    build_dataset([source], tokenizer, cfg(tmp_path), 0)
    assert calls == []

    def offline(path, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(
            f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed."
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        UserError, match=r"data.train\[0\] \(org/missing\): not a local file or folder, and loading"
    ):
        build_dataset([DataSource("org/missing")], tokenizer, cfg(tmp_path), 0)
    for local in ("./nope.jsonl", "data/train.parquet", "a/b/c"):
        with pytest.raises(UserError, match="data file not found"):
            build_dataset([DataSource(local)], tokenizer, cfg(tmp_path), 0)


# ----------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_counts_fractions_and_statistics(tmp_path: Path, tokenizer) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)  # 10 pairs
    b = write_jsonl(tmp_path / "b.jsonl", [*ROWS[:7], {"prompt": "bad"}])  # 7 pairs and a bad row
    mixture = [DataSource(str(a), count=25), DataSource(str(b), fraction=0.5)]
    data = build_dataset(mixture, tokenizer, cfg(tmp_path, on_bad_row="skip"), seed=3)
    first, second = data.stats["sources"]
    assert (first["kept"], first["sampled"]) == (10, 25)  # count: exact, with 2 whole repeats
    assert (second["rows"], second["kept"], second["sampled"]) == (8, 7, 4)  # round(3.5): within 1
    assert second["filters"]["bad_row"] == {"dropped": 1, "left": 7}
    assert len(data) == 29 and [p.pair_id for p in data.pairs] == list(range(29))
    assert "8 rows -> 7 kept -> 4 sampled (dropped: bad_row 1; truncated: none)" in data.summary()
    assert data.stats["tokens"]["prompt"]["max"] == 13 and set(data.stats["tokens"]) == {
        "prompt", "chosen", "rejected", "sequence"
    }  # fmt: skip
    by_content = {}
    for key in contents(data)[:25]:
        by_content[key] = by_content.get(key, 0) + 1
    assert sorted(by_content.values()) == [2] * 5 + [3] * 5  # 2 repeats + 5 distinct extra
    assert contents(build_dataset(mixture, tokenizer, cfg(tmp_path, on_bad_row="skip"), seed=3)) == contents(
        data
    )
    other_seed = build_dataset(mixture, tokenizer, cfg(tmp_path, on_bad_row="skip"), seed=4)
    assert contents(other_seed) != contents(data) and len(other_seed) == 29
    for fraction, expected in ((0.33, 3.3), (0.75, 7.5), (1.9, 19.0)):
        got = len(build_dataset([DataSource(str(a), fraction=fraction)], tokenizer, cfg(tmp_path), 0))
        assert abs(got - expected) <= 1


def test_a_sample_does_not_depend_on_where_the_data_lives(tmp_path: Path, tokenizer) -> None:
    here = write_jsonl(tmp_path / "here" / "a.jsonl", ROWS)
    moved = write_jsonl(tmp_path / "elsewhere" / "deeper" / "a.jsonl", ROWS)
    sample = [
        contents(build_dataset([DataSource(str(p), count=6)], tokenizer, cfg(tmp_path), 0))
        for p in (here, moved)
    ]
    assert sample[0] == sample[1] and len(set(sample[0])) == 6


def test_split_eval_is_seeded_and_disjoint_by_row(tmp_path: Path, tokenizer) -> None:
    data = build_dataset(
        [DataSource(str(write_jsonl(tmp_path / "a.jsonl", ROWS)), fraction=2.0)], tokenizer, cfg(tmp_path), 0
    )
    train, held_out = split_eval(data, 0.2, seed=5)
    assert len(held_out) == 2 and len(train) == 16  # 2 of 10 rows; their repeats leave train too
    assert not set(contents(train)) & set(contents(held_out))
    assert [p.pair_id for p in held_out.pairs] == [0, 1] and [p.pair_id for p in train.pairs] == list(
        range(16)
    )
    assert train.stats["eval_held_out"] == {"fraction": 0.2, "rows": 2, "pairs_removed": 4}
    again_train, again_eval = split_eval(data, 0.2, seed=5)
    assert contents(again_eval) == contents(held_out) and contents(again_train) == contents(train)
    assert contents(split_eval(data, 0.2, seed=6)[1]) != contents(held_out)
    with pytest.raises(UserError, match="eval_fraction"):
        split_eval(data, 0.01, seed=5)


# ----------------------------------------------------------------------------------------------
# The tokenisation cache


def test_second_run_does_no_tokenisation_and_changes_retokenise(tmp_path: Path, calls) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    sources = [DataSource(str(path))]
    first = build_dataset(sources, word_tokenizer(), cfg(tmp_path), 0)
    assert sum(calls) == len(ROWS)

    def tokenised(tokenizer=None, source=None, **settings) -> int:
        calls.clear()
        data = build_dataset(
            [source or sources[0]], tokenizer or word_tokenizer(), cfg(tmp_path, **settings), 0
        )
        assert len(data)
        return sum(calls)

    assert tokenised() == 0  # same everything: read from the cache
    # length and row-policy settings apply after the cache: same tokens, new truncation, no re-run
    assert tokenised(max_length=20, on_bad_row="skip", truncation="drop", max_prompt_length=13) == 0
    short = build_dataset(sources, word_tokenizer(), cfg(tmp_path, max_length=14), 0)
    assert (
        [len(p.chosen_ids) for p in short.pairs]
        == [1] * len(ROWS)
        != [len(p.chosen_ids) for p in first.pairs]
    )
    assert tokenised(source=DataSource(str(path), count=3)) == 0  # so do sampling and mixing
    # what the tokens depend on: each change tokenises again, once
    other_vocab = word_tokenizer()
    other_vocab.add_tokens(["sort 3"])
    bos = word_tokenizer(bos=True)
    other_template = word_tokenizer(CHATML + "{{ '' }}")  # renders the same, but is another template
    for change in (
        {"tokenizer": other_vocab},
        {"tokenizer": bos},
        {"tokenizer": other_template},
        {"chat_template": CHATML + "{# an override #}"},
        {"format": "conversational"},
        {"columns": {"rejected": "rejected"}},
    ):
        assert tokenised(**change) == len(ROWS), change
        assert tokenised(**change) == 0, change
    write_jsonl(path, [*ROWS[:9], {**ROWS[9], "chosen": "1 9"}])  # same size, new content
    assert tokenised() == len(ROWS)


def test_unreadable_cache_is_rebuilt(tmp_path: Path, tokenizer, calls) -> None:
    sources = [DataSource(str(write_jsonl(tmp_path / "a.jsonl", ROWS)))]
    reference = contents(build_dataset(sources, tokenizer, cfg(tmp_path), 0))
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == len(ROWS) and manifest["identity"]["format"] == "auto"
    for shard in manifest["shards"]:
        (folder / shard).unlink()
    calls.clear()
    assert contents(build_dataset(sources, tokenizer, cfg(tmp_path), 0)) == reference
    assert sum(calls) == len(ROWS)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no staging left behind


def test_tokenising_in_two_processes_gives_the_same_rows(tmp_path: Path, tokenizer) -> None:
    rows = ROWS * 30
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [*rows[:150], {"prompt": [msg("wizard", "x")], "chosen": "1", "rejected": "2"}, *rows[150:]],
    )
    one = build_dataset([DataSource(str(path))], tokenizer, cfg(tmp_path, num_proc=1, on_bad_row="skip"), 0)
    shutil.rmtree(tmp_path / "cache")
    two = build_dataset([DataSource(str(path))], tokenizer, cfg(tmp_path, num_proc=2, on_bad_row="skip"), 0)
    assert contents(one) == contents(two) and one.stats == two.stats and len(one) == 300
    with pytest.raises(UserError, match=r"row 150 \(line 151\): prompt\[0\]: unknown role 'wizard'"):
        build_dataset([DataSource(str(path))], tokenizer, cfg(tmp_path, num_proc=2), 0)


# ----------------------------------------------------------------------------------------------
# Under torch.distributed: rank 0 tokenises, the others wait and read its cache


def _rank_main(rank: int, world: int, store: str, scenarios: list[tuple[str, list[str]]], out: str) -> None:
    """One rank: build each (path, cache folder per rank) in turn; record pairs or the error."""
    import torch.distributed as dist

    import engine.data.tokenize as tok

    os.environ["LOCAL_RANK"] = "0"  # each rank plays the first rank of its own node
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows: list[int] = []
    real = tok.tokenize_rows
    tok.tokenize_rows = lambda batch, indices, **kw: rows.append(len(indices)) or real(batch, indices, **kw)
    results = []
    for path, cache_dirs in scenarios:
        rows.clear()
        result: dict = {}
        try:
            data_cfg = DataConfig(max_length=64, cache_dir=cache_dirs[rank])
            result["pairs"] = contents(build_dataset([DataSource(path)], word_tokenizer(), data_cfg, 0))
        except UserError as e:
            result["error"] = str(e)
        result["tokenised"] = sum(rows)
        results.append(result)
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank0_tokenises_while_others_wait_and_errors_reach_every_rank(tmp_path: Path) -> None:
    good = str(write_jsonl(tmp_path / "good.jsonl", ROWS))
    bad = str(write_jsonl(tmp_path / "bad.jsonl", [*ROWS, {"prompt": 1}]))
    shared = [str(tmp_path / "shared")] * 2
    scenarios = [
        (good, shared),
        (good, [str(tmp_path / "node0"), str(tmp_path / "node1")]),  # node-local cache folders
        (str(tmp_path / "missing.jsonl"), shared),  # only rank 0 looks at the file
        (bad, shared),  # every rank finds the bad row in the cache
    ]
    context = forkserver()  # real processes, without each importing torch (tests/forked.py)
    args = (str(tmp_path / "store"), scenarios, str(tmp_path))
    procs = [context.Process(target=_rank_main, args=(rank, 2, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rank0, rank1 = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2))
    # rank 0 tokenises, rank 1 waits and reads the same cache
    assert (rank0[0]["tokenised"], rank1[0]["tokenised"]) == (len(ROWS), 0)
    assert rank0[0]["pairs"] == rank1[0]["pairs"] and len(rank0[0]["pairs"]) == len(ROWS)
    # a node that cannot see rank 0's folder builds its own copy
    assert (rank0[1]["tokenised"], rank1[1]["tokenised"]) == (len(ROWS), len(ROWS))
    assert rank0[1]["pairs"] == rank1[1]["pairs"]
    # errors stop every rank with the same message
    for k, words in ((2, "data file not found"), (3, "row 10 (line 11)")):
        assert rank0[k]["error"] == rank1[k]["error"] and words in rank0[k]["error"], (rank0[k], rank1[k])
