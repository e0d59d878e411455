"""Recipes: typing, extends, overrides, the resolved recipe, and one clear error per mistake."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torchrun_train
from engine.config import Config, field_docs
from engine.errors import UserError
from engine.recipe import load_config, reference_doc, to_toml
from tests.conftest import REPO, write_recipe

GOOD = {
    "model": {"path": "some/model"},
    "data": {"train": ["train.jsonl"]},
}


def test_types_overrides_and_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = write_recipe(
        tmp_path / "base.toml",
        {**GOOD, "optimizer": {"lr": 1e-5, "betas": [0.9, 0.95]}, "training": {"micro_batch_size": 2}},
    )
    child = write_recipe(tmp_path / "child.toml", {"optimizer": {"lr": 3e-6}}, extends=base.name)
    cfg = load_config(child, ["training.global_batch_size=32", "loss.type=simpo", "job.output_dir=out/x"])
    assert cfg.optimizer.lr == 3e-6  # child beats base
    assert cfg.optimizer.betas == [0.9, 0.95]  # inherited
    assert cfg.training.micro_batch_size == 2
    assert cfg.training.global_batch_size == 32  # override, typed as int
    assert cfg.loss.type == "simpo"
    assert cfg.job.output_dir == str(tmp_path.resolve() / "out" / "x")  # made absolute at load
    # not a local file (nothing named so here): kept as written, like a hub id
    assert cfg.data.train[0].path == "train.jsonl" and cfg.data.train[0].fraction == 1.0
    # an int where a float is expected is accepted and converted
    assert isinstance(load_config(child, ["optimizer.lr=1"]).optimizer.lr, float)
    # list-valued override
    assert load_config(child, ['loss.type=["dpo", "sft"]', "loss.weights=[1.0, 0.5]"]).loss.weights == [
        1.0,
        0.5,
    ]


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.toml", {**GOOD, "data": {"train": [{"path": "a.jsonl", "count": 10}]}}
    )
    cfg = load_config(recipe, ["optimizer.lr=2e-6"])
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(to_toml(cfg))
    assert load_config(resolved) == cfg


def test_every_field_is_documented() -> None:
    import dataclasses
    import typing

    for cls in typing.get_type_hints(Config).values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    assert "`optimizer.lr`" in reference_doc()


BAD_RECIPES = [
    # (tables, overrides, words the one-line message must contain)
    ({**GOOD, "optimizer": {"lrr": 1e-6}}, [], ["optimizer.lrr", 'did you mean "optimizer.lr"']),
    ({**GOOD, "trainig": {"epochs": 1}}, [], ["trainig", 'did you mean "training"']),
    ({**GOOD, "training": {"epochs": "three"}}, [], ["training.epochs", "integer"]),
    ({**GOOD, "training": {"micro_batch_size": 0}}, [], ["training.micro_batch_size", ">= 1"]),
    ({"data": {"train": ["t.jsonl"]}}, [], ["model.path"]),
    ({"model": {"path": "m"}}, [], ["data.train"]),
    ({**GOOD, "loss": {"type": "dpoo"}}, [], ["loss.type", 'did you mean "dpo"']),
    ({**GOOD, "scheduler": {"warmup_steps": 10, "warmup_ratio": 0.1}}, [], ["warmup_steps", "warmup_ratio"]),
    ({**GOOD, "scheduler": {"type": "cosin"}}, [], ["scheduler.type", '"cosine"']),
    ({**GOOD, "parallel": {"compile": "yes"}}, [], ["parallel.compile", "true/false"]),
    ({**GOOD, "loss": {"type": ["dpo", "sft"], "weights": [1.0]}}, [], ["loss.weights", "2 weights"]),
    ({**GOOD, "loss": {"label_smoothing": 0.7}}, [], ["loss.label_smoothing", "[0, 0.5)"]),
    ({**GOOD, "optimizer": {"betas": [0.9]}}, [], ["optimizer.betas"]),
    (GOOD, ["optimizer.lr=fast"], ["optimizer.lr", "number"]),
    (GOOD, ["optimiser.lr=1e-6"], ["optimiser.lr", 'did you mean "optimizer"']),
    (GOOD, ["training.epoch=2"], ["training.epoch", 'did you mean "training.epochs"']),
    (GOOD, ["training.epochs"], ["training.epochs", "table.key=value"]),
]


@pytest.mark.parametrize("tables,overrides,words", BAD_RECIPES)
def test_bad_recipes_exit_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture, tables: dict, overrides: list, words: list
) -> None:
    recipe = write_recipe(tmp_path / "bad.toml", tables)
    assert torchrun_train.main([str(recipe), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_every_mistake_is_reported_at_once_in_recipe_order(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(
        '[model]\npath = "m"\n'
        '[data]\ntrain = ["t.jsonl"]\nmax_lenght = 512\n'
        '[training]\nepochs = "three"\nmicro_batch_size = 0\n'
        "[loss]\nbeta = -1.0\n"
    )
    assert torchrun_train.main([str(recipe), "optimizer.lr=fast", "training.epoch=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        # the command line's unknown keys first, then the recipe's problems in its order
        'fsdpo: error: training.epoch: unknown key in [training] (did you mean "training.epochs"?)',
        'fsdpo: error: data.max_lenght: unknown key in [data] (did you mean "data.max_length"?)',
        "fsdpo: error: training.epochs: expected an integer, got 'three'",
        "fsdpo: error: training.micro_batch_size: expected >= 1, got 0",
        "fsdpo: error: loss.beta: expected a number > 0, got -1.0",
        "fsdpo: error: optimizer.lr: expected a number, got 'fast'",  # a table the recipe lacks: last
    ]


@pytest.mark.parametrize(
    "text,line",
    [
        # max_prompt_length is not compared with the default max_length that stands in for "4096"
        (
            '[data]\ntrain = ["t.jsonl"]\nmax_length = "4096"\nmax_prompt_length = 2048\n',
            "data.max_length: expected an integer, got '4096'",
        ),
        # the weights are not counted against a loss.type that is neither a name nor a list
        (
            '[data]\ntrain = ["t.jsonl"]\n[loss]\ntype = 3\nweights = [1.0, 2.0]\n',
            "loss.type: expected string or list of string, got 3",
        ),
        ('training = 5\n[data]\ntrain = ["t.jsonl"]\n', "training: expected a [training] table, got 5"),
    ],
)
def test_checks_that_depend_on_a_failed_value_are_skipped(tmp_path: Path, text: str, line: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(text + '[model]\npath = "m"\n')
    with pytest.raises(UserError) as e:
        load_config(recipe)
    assert e.value.lines == [line]


def test_user_error_carries_lines_and_pickles() -> None:
    error = UserError("a.b: expected x", "c.d: expected y")
    assert error.lines == ["a.b: expected x", "c.d: expected y"]
    assert str(error) == "a.b: expected x\nc.d: expected y"
    assert pickle.loads(pickle.dumps(error)).lines == error.lines  # as broadcast between ranks
    with pytest.raises(TypeError):
        UserError()


def test_relative_paths_are_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, recipes, elsewhere = (tmp_path.resolve() / name for name in ("work", "recipes", "elsewhere"))
    for folder in (work / "models" / "tiny", work / "data", recipes, elsewhere, tmp_path / "home"):
        folder.mkdir(parents=True)
    (work / "data" / "train.jsonl").write_text("{}\n")
    (work / "chat.jinja").write_text("{{ messages }}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = write_recipe(
        recipes / "base.toml", {"model": {"path": "models/tiny"}, "job": {"output_dir": "out/run"}}
    )
    recipe = write_recipe(
        recipes / "child.toml",
        {
            "data": {
                "train": [
                    "data/train.jsonl",
                    "org/prefs",
                    {"path": "./data/../data/train.jsonl", "count": 5},
                ],
                "chat_template": "chat.jinja",
                "cache_dir": "cache",
            },
            "reference": {"cache_dir": "~/refs"},
            "checkpoint": {"resume": "out/run/checkpoints/step-2"},
        },
        extends=base.name,  # `extends` is relative to the recipe, everything else to the cwd
    )
    monkeypatch.chdir(work)
    cfg = load_config(recipe)
    assert cfg.model.path == str(work / "models" / "tiny")
    assert [s.path for s in cfg.data.train] == [
        str(work / "data" / "train.jsonl"),
        "org/prefs",  # a hub id stays as written
        str(work / "data" / "train.jsonl"),
    ]
    assert cfg.data.chat_template == str(work / "chat.jinja")
    assert cfg.data.cache_dir == str(work / "cache")
    assert cfg.reference.cache_dir == str(tmp_path / "home" / "refs")
    assert cfg.job.output_dir == str(work / "out" / "run")
    assert cfg.checkpoint.resume == str(work / "out" / "run" / "checkpoints" / "step-2")
    # the stored recipe means the same from any directory
    stored = elsewhere / "recipe.toml"
    stored.write_text(to_toml(cfg))
    monkeypatch.chdir(elsewhere)
    assert load_config(stored) == cfg
    # a template given as text is not a path
    assert load_config(stored, ["data.chat_template={{ messages }}"]).data.chat_template == "{{ messages }}"


def test_a_relative_model_path_typo_fails_at_once_without_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.model

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("the typo was tried as a hub id")

    monkeypatch.setattr(engine.model.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(engine.model.AutoConfig, "from_pretrained", no_hub)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.toml", {**GOOD, "model": {"path": "models/qwen"}})
    start = time.monotonic()
    cfg = load_config(recipe)
    assert cfg.model.path == str(tmp_path.resolve() / "models" / "qwen")
    with pytest.raises(UserError, match=r"model\.path: folder .*/models/qwen not found"):
        engine.model.build_tokenizer(cfg.model)
    assert time.monotonic() - start < 5


def test_missing_recipe_and_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert torchrun_train.main([str(tmp_path / "nope.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    (tmp_path / "broken.toml").write_text("[model\npath = 1\n")
    assert torchrun_train.main([str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    (tmp_path / "cycle.toml").write_text('extends = "cycle.toml"\n')
    with pytest.raises(UserError, match="cycle"):
        load_config(tmp_path / "cycle.toml")


def test_cli_exit_code_and_no_traceback(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "bad.toml", {**GOOD, "optimizer": {"lrr": 1e-6}})
    proc = subprocess.run(
        [sys.executable, str(REPO / "torchrun_train.py"), str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        'fsdpo: error: optimizer.lrr: unknown key in [optimizer] (did you mean "optimizer.lr"?)'
    ]


def test_readme_recipe_reference_is_in_sync() -> None:
    readme = (REPO / "README.md").read_text()
    assert reference_doc() in readme, (
        "regenerate the README's recipe reference: python -m engine.recipe --doc"
    )


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q"
    assert command in readme
    for part in command.split(" && "):
        assert part in ci
