"""Data: templating and completion split, truncation, bad rows, and the global-batch sampler."""

from __future__ import annotations

import functools
import json
import operator
from pathlib import Path

import pytest

from engine.config import DataConfig, DataSource, ModelConfig
from engine.data import GlobalBatchSampler, build_dataset, shard_for_inference
from engine.errors import UserError
from engine.model import build_tokenizer
from engine.recipe import load_config, to_toml
from tests.conftest import ASSETS, write_recipe


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default tokenisation cache (under $XDG_CACHE_HOME) in a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(path=str(ASSETS / "tiny-llama")))


def _write(tmp_path: Path, rows: list) -> DataSource:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSource(path=str(path))


def _one(tmp_path: Path, tokenizer, row: dict, max_length: int = 256):
    return build_dataset([_write(tmp_path, [row])], tokenizer, DataConfig(max_length=max_length), 0)


def test_conversational_pair_split_at_the_generation_prompt(tmp_path: Path, tokenizer) -> None:
    row = {
        "prompt": [
            {"role": "system", "content": "be tidy"},
            {"role": "user", "content": "sort: 3 1"},
            {"role": "assistant", "content": "1 3"},
            {"role": "user", "content": "sort: 2 9 4"},
        ],
        "chosen": [{"role": "assistant", "content": "2 4 9"}],
        "rejected": [{"role": "assistant", "content": "9 4 2"}],
    }
    pair = _one(tmp_path, tokenizer, row).pairs[0]
    assert tokenizer.decode(pair.prompt_ids) == (
        "<|im_start|>system\nbe tidy<|im_end|>\n<|im_start|>user\nsort: 3 1<|im_end|>\n"
        "<|im_start|>assistant\n1 3<|im_end|>\n<|im_start|>user\nsort: 2 9 4<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # only the final assistant turn is trained, closed by EOS (<|im_end|>), no template newline after it
    assert tokenizer.decode(pair.chosen_ids) == "2 4 9<|im_end|>"
    assert tokenizer.decode(pair.rejected_ids) == "9 4 2<|im_end|>"
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id
    # prompt + completion tokens are exactly the tokenisation of the whole conversation
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert pair.prompt_ids + pair.chosen_ids == tokenizer(full, add_special_tokens=False)["input_ids"][:-1]


def test_implicit_prompt_conversations(tmp_path: Path, tokenizer) -> None:
    user = [{"role": "user", "content": "sort: 2 1"}]
    row = {
        "chosen": [*user, {"role": "assistant", "content": "1 2"}],
        "rejected": [*user, {"role": "assistant", "content": "2 1"}],
    }
    pair = _one(tmp_path, tokenizer, row).pairs[0]
    assert tokenizer.decode(pair.prompt_ids).endswith("sort: 2 1<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids) == "1 2<|im_end|>"


def test_standard_strings_get_eos(tmp_path: Path, tokenizer) -> None:
    pair = _one(tmp_path, tokenizer, {"prompt": "sort: 5 4", "chosen": "4 5", "rejected": "5 4"}).pairs[0]
    assert tokenizer.decode(pair.prompt_ids) == "sort: 5 4"
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.chosen_ids[:-1]) == "4 5"


def test_truncation_keeps_the_start_and_drops_pairs_without_completion(tmp_path: Path, tokenizer) -> None:
    row = {"prompt": "sort: 5 4 3 2 1", "chosen": "1 2 3 4 5", "rejected": "5 4 3 2 1"}
    full = _one(tmp_path, tokenizer, row).pairs[0]
    cut = _one(tmp_path, tokenizer, row, max_length=len(full.prompt_ids) + 2).pairs[0]
    assert cut.chosen_ids == full.chosen_ids[:2] and cut.rejected_ids == full.rejected_ids[:2]
    rows = [row, {"prompt": "sort: " + " ".join(["7"] * 80), "chosen": "7", "rejected": "8"}]
    data = build_dataset([_write(tmp_path, rows)], tokenizer, DataConfig(max_length=40), 0)
    assert len(data) == 1 and data.stats["sources"][0]["filters"]["no_trainable_token"]["dropped"] == 1


@pytest.mark.parametrize(
    "row,words",
    [
        ({"prompt": "p", "chosen": "c"}, ["row 0", "missing column 'rejected'"]),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, ["row 0", "prompt"]),
        (
            {"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
            ["assistant"],
        ),
        (
            {
                "prompt": [{"role": "wizard", "content": "x"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ["unknown role 'wizard'"],
        ),
        (
            {
                "prompt": [],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ["prompt", "non-empty"],
        ),
    ],
)
def test_bad_rows_name_file_row_and_problem(tmp_path: Path, tokenizer, row: dict, words: list) -> None:
    with pytest.raises(UserError) as e:
        _one(tmp_path, tokenizer, row)
    assert "d.jsonl" in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_fraction_and_count_sampling(tmp_path: Path, tokenizer) -> None:
    rows = [{"prompt": f"sort: {i} 1", "chosen": f"1 {i}", "rejected": f"{i} 1"} for i in range(2, 12)]
    src = _write(tmp_path, rows)
    cfg = DataConfig(max_length=64)
    assert len(build_dataset([DataSource(path=src.path, count=4)], tokenizer, cfg, 0)) == 4
    assert len(build_dataset([DataSource(path=src.path, fraction=2.5)], tokenizer, cfg, 0)) == 25
    a = build_dataset([DataSource(path=src.path, fraction=0.5)], tokenizer, cfg, 1)
    b = build_dataset([DataSource(path=src.path, fraction=0.5)], tokenizer, cfg, 1)
    assert [p.prompt_ids for p in a.pairs] == [p.prompt_ids for p in b.pairs]


def test_sampler_global_batch_is_independent_of_the_split() -> None:
    n, gbs = 50, 8
    for step in range(12):  # crosses an epoch boundary (6 steps per epoch)
        reference = GlobalBatchSampler(n, gbs, 8, 0, 1, seed=3).micro_batches(step)[0]
        for world, micro in ((2, 2), (4, 1), (2, 4)):
            got = []
            for rank in range(world):
                for mb in GlobalBatchSampler(n, gbs, micro, rank, world, seed=3).micro_batches(step):
                    assert len(mb) == micro
                    got += mb
            assert got == reference
    s = GlobalBatchSampler(n, gbs, 8, 0, 1, seed=3)
    epoch0 = functools.reduce(operator.iadd, (s.micro_batches(i)[0] for i in range(6)), [])
    epoch1 = functools.reduce(operator.iadd, (s.micro_batches(i)[0] for i in range(6, 12)), [])
    assert len(set(epoch0)) == 48 and epoch0 != epoch1  # no repeats within an epoch; reshuffled
    assert GlobalBatchSampler(n, gbs, 8, 0, 1, seed=4).micro_batches(0) != s.micro_batches(0)


def test_sampler_rejects_batch_arithmetic_that_does_not_divide() -> None:
    with pytest.raises(UserError, match="global_batch_size=10 must be a multiple"):
        GlobalBatchSampler(100, 10, 4, 0, 2, seed=0)


def test_inference_shards_are_disjoint_complete_and_in_step() -> None:
    n, batch, world = 11, 3, 2
    shards = [shard_for_inference(n, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forwards on every rank
    seen = [i for s in shards for idx, ok in s for i, v in zip(idx, ok) if v]
    assert sorted(seen) == list(range(n))


def test_data_recipe_keys_parse_validate_and_round_trip(tmp_path: Path) -> None:
    tables = {
        "model": {"path": "m"},
        "data": {
            "train": [
                "a.jsonl",
                {"path": "org/prefs", "split": "train_prefs", "revision": "v2", "count": 100},
                {"path": "b.parquet", "fraction": 0.5, "columns": {"chosen": "good"}},
            ],
            "columns": {"prompt": "question"},
            "max_prompt_length": 512,
            "truncation": "drop",
            "group_by_length": True,
        },
    }
    recipe = write_recipe(tmp_path / "r.toml", tables)
    cfg = load_config(recipe, ['data.columns={rejected = "bad"}', "data.eval_fraction=0.1"])
    assert cfg.data.columns == {"rejected": "bad"}  # an override replaces the whole table
    assert cfg.data.train[1] == DataSource("org/prefs", split="train_prefs", revision="v2", count=100)
    assert cfg.data.train[2].columns == {"chosen": "good"} and cfg.data.eval_fraction == 0.1
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "resolved.toml") == cfg
    for override, words in (
        (
            'data.columns={chossen = "a"}',
            'data.columns.chossen: expected keys prompt, chosen, rejected, completion or label (did you mean "chosen"?)',
        ),
        ("data.columns={chosen = 1}", "data.columns.chosen: expected a string"),
        ("data.columns=3", "data.columns: expected a table of strings"),
        (
            "data.max_prompt_length=1024",
            "data.max_prompt_length: expected 0 (off) or an integer below data.max_length=1024",
        ),
        ('data.eval=["e.jsonl"]', "data.eval and data.eval_fraction: set one of them"),
        ("data.format=chat", 'data.format: expected one of "auto" | "standard"'),
        ("data.on_bad_row=ignore", 'data.on_bad_row: expected one of "error" | "skip"'),
    ):
        with pytest.raises(UserError) as e:
            load_config(recipe, ["data.eval_fraction=0.1", override])
        assert words in str(e.value), (override, str(e.value))
