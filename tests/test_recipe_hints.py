"""Hints for TRL, open-instruct and torchtune users: their names for fsdpo's keys and losses."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest

from engine.config import Config
from engine.errors import UserError
from engine.losses import LOSSES
from engine.peer_names import PEER_KEYS, PEER_LOSSES
from engine.recipe import load_config
from tests.conftest import write_recipe

GOOD = {"model": {"path": "m"}, "data": {"train": ["t.jsonl"]}}
TABLES = {table: set(typing.get_type_hints(cls)) for table, cls in typing.get_type_hints(Config).items()}
TABLE_KEY = re.compile(rf"\b({'|'.join(TABLES)})\.([a-z_]+)\b")


def _is_fsdpo_key(key: str) -> bool:
    table, _, name = key.partition(".")
    return table in TABLES and (not name or name in TABLES[table])


def test_every_key_and_loss_the_tables_name_exists() -> None:
    for peer, (key, note) in PEER_KEYS.items():
        assert key or note, peer
        assert not key or _is_fsdpo_key(key), (peer, key)
        for table, name in TABLE_KEY.findall(note):  # keys quoted in the notes, too
            assert name in TABLES[table], (peer, f"{table}.{name}")
        if key == "loss.type":  # the loss names its note suggests
            assert all(loss in LOSSES for loss in re.findall(r'"(\w+)"', note)), (peer, note)
        # an entry for a name fsdpo accepts where it stands would never be used
        table, _, name = peer.rpartition(".")
        if table:  # a peer's name inside one of fsdpo's tables
            assert table in TABLES and name not in TABLES[table], peer
        else:
            assert peer not in TABLES, peer
    for peer, (_, ours) in PEER_LOSSES.items():
        assert peer not in LOSSES, peer
        assert not ours or ours in LOSSES, (peer, ours)


def test_every_trl_loss_type_is_known_or_explained() -> None:
    """TRL's own list of `loss_type` values, read from the installed DPOConfig."""
    trl = pytest.importorskip("trl")
    doc = inspect.getsource(trl.DPOConfig)
    listed = doc[doc.index("loss_type (") :].split("If multiple", 1)[0]
    names = re.findall(r"`'(\w+)'`", listed)
    assert "sigmoid" in names and "hinge" in names, listed
    for name in names:
        assert name in LOSSES or name in PEER_LOSSES, name


# TRL DPOConfig fields (with transformers' TrainingArguments) a DPO recipe commonly sets
TRL_NAMES = [
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_epsilon",
    "optim",
    "max_grad_norm",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "torch_compile",
    "output_dir",
    "seed",
    "logging_steps",
    "report_to",
    "run_name",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "resume_from_checkpoint",
    "push_to_hub",
    "hub_model_id",
    "max_length",
    "truncation_mode",
    "padding_free",
    "dataset_num_proc",
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "use_weighting",
    "ld_alpha",
    "f_divergence_type",
    "discopop_tau",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "sync_ref_model",
    "activation_offloading",
]


def test_common_trl_names_are_trl_names_and_get_a_hint(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    assert set(TRL_NAMES) <= fields, set(TRL_NAMES) - fields
    recipe = write_recipe(tmp_path / "r.toml", GOOD)
    for name in TRL_NAMES:
        with pytest.raises(UserError) as e:
            load_config(recipe, [f"{name}=1"])
        (line,) = e.value.lines
        assert line.startswith(f"{name}: overrides look like table.key=value (") and line.endswith(")"), line


@pytest.mark.parametrize(
    "name,hint",
    [
        ("learning_rate", 'did you mean "optimizer.lr"?'),
        ("beta", 'did you mean "loss.beta"?'),  # an fsdpo key in another table
        ("loss_type", 'did you mean "loss.type"?'),
        ("dpo_loss_type", 'did you mean "loss.type"?'),
        ("dpo_beta", 'did you mean "loss.beta"?'),
        ("gradient_accumulation_steps", "global_batch_size / (micro_batch_size x ranks)"),
        ("per_device_train_batch_size", 'did you mean "training.micro_batch_size"?'),
        ("batch_size", 'did you mean "training.micro_batch_size"?'),
        ("num_train_epochs", 'did you mean "training.epochs"?'),
        ("epochs", 'did you mean "training.epochs"?'),
        ("warmup_ratio", 'did you mean "scheduler.warmup_ratio"?'),
        ("lr_scheduler_type", 'did you mean "scheduler.type"?'),
        ("max_prompt_length", 'did you mean "data.max_prompt_length"?'),
        ("max_length", 'did you mean "data.max_length"?'),
        ("max_seq_length", 'did you mean "data.max_length"?'),
        ("max_grad_norm", 'did you mean "optimizer.max_grad_norm"?'),
        ("clip_grad_norm", 'did you mean "optimizer.max_grad_norm"?'),
        ("gradient_checkpointing", 'did you mean "parallel.activation_checkpointing"? set it to "full"'),
        ("bf16", 'did you mean "parallel.mixed_precision"?'),
        ("output_dir", 'did you mean "job.output_dir"?'),
        ("seed", 'did you mean "job.seed"?'),
        ("model_name_or_path", 'did you mean "model.path"?'),
        ("dataset_name", 'did you mean "data.train"?'),
        ("dataset_mixer_list", 'did you mean "data.train"? a list of sources'),
        ("rpo_alpha", 'loss.type = ["dpo", "sft"] with loss.weights = [1.0, ALPHA]'),
        ("simpo_gamma", 'did you mean "loss.gamma_beta_ratio"? SimPO\'s margin as gamma / beta'),
        ("gamma_beta_ratio", 'did you mean "loss.gamma_beta_ratio"?'),
        ("use_peft", 'did you mean "lora.enabled"?'),
        ("lora_r", 'did you mean "lora.r"?'),
        ("lora_rank", 'did you mean "lora.r"?'),
        ("lora_alpha", 'did you mean "lora.alpha"?'),
        ("ld_alpha", 'did you mean "loss.ld_alpha"?'),  # TRL's name, an fsdpo key
        ("ref_model_sync_steps", 'did you mean "reference.sync_steps"?'),  # TR-DPO's tau in TRL
        ("if_tdpo2", 'did you mean "loss.type"? "tdpo" is TDPO2'),  # TDPO's code
    ],
)
def test_peer_names_point_to_fsdpo_keys_at_every_level(tmp_path: Path, name: str, hint: str) -> None:
    """The same hint for the name at the top level, inside a table and as an override."""
    top = tmp_path / "top.toml"
    top.write_text(f"{name} = 1\n" + write_recipe(tmp_path / "good.toml", GOOD).read_text())
    in_table = write_recipe(tmp_path / "in_table.toml", {**GOOD, "training": {name: 1}})
    cases = [
        (top, [], f"{name}: unknown key in the recipe"),
        (tmp_path / "good.toml", [f"{name}=1"], f"{name}: overrides look like table.key=value"),
    ]
    if name not in TABLES["training"]:  # `epochs` is right in [training]
        cases += [
            (in_table, [], f"training.{name}: unknown key in [training]"),
            (tmp_path / "good.toml", [f"training.{name}=1"], f"training.{name}: unknown key in [training]"),
        ]
    for recipe, overrides, where in cases:
        with pytest.raises(UserError) as e:
            load_config(recipe, overrides)
        assert len(e.value.lines) == 1, e.value.lines
        assert e.value.lines[0].startswith(where) and hint in e.value.lines[0], e.value.lines[0]


@pytest.mark.parametrize(
    "table,name,hint",
    [
        ("optimizer", "_component_", "fsdpo's optimizer is always AdamW"),  # torchtune
        ("loss", "_component_", 'did you mean "loss.type"?'),
        ("loss", "gamma", 'did you mean "loss.gamma_beta_ratio"?'),
        ("loss", "alpha", 'did you mean "loss.tdpo_alpha"?'),  # TDPO's code, not lora.alpha
        ("model", "lora_rank", 'did you mean "lora.r"?'),
        ("optimizer", "learning_rate", 'did you mean "optimizer.lr"?'),
        ("optimizer", "lrr", 'did you mean "optimizer.lr"?'),  # no peer name: a close spelling
        ("training", "lr", 'did you mean "optimizer.lr"?'),  # the fsdpo key in another table
    ],
)
def test_names_inside_tables(tmp_path: Path, table: str, name: str, hint: str) -> None:
    recipe = write_recipe(tmp_path / "r.toml", {**GOOD, table: {**GOOD.get(table, {}), name: 1}})
    with pytest.raises(UserError) as e:
        load_config(recipe)
    (line,) = e.value.lines
    assert line.startswith(f"{table}.{name}: unknown key in [{table}] (") and hint in line, line


@pytest.mark.parametrize(
    "loss,hint",
    [
        ("sigmoid", '(TRL\'s "sigmoid" is fsdpo\'s "dpo")'),
        ("sigmoid_norm", '(TRL\'s "sigmoid_norm" is fsdpo\'s "dpo_norm")'),
        ("aot_pair", '(TRL\'s "aot_pair" is fsdpo\'s "aot_unpaired")'),
        ("kto_pair", '(TRL\'s "kto_pair" is not in fsdpo, which has '),
        ("torchtune.rlhf.loss.DPOLoss", '(torchtune\'s "DPOLoss" is fsdpo\'s "dpo")'),
        ("RSOLoss", '(torchtune\'s "RSOLoss" is fsdpo\'s "hinge")'),
        ("SimPOLoss", '(torchtune\'s "SimPOLoss" is fsdpo\'s "simpo")'),
        ("dpoo", '(did you mean "dpo"?)'),  # no peer name: a close spelling
    ],
)
def test_peer_loss_names(tmp_path: Path, loss: str, hint: str) -> None:
    recipe = write_recipe(tmp_path / "r.toml", GOOD)
    with pytest.raises(UserError) as e:
        load_config(recipe, [f"loss.type={loss}"])
    assert e.value.lines[0].startswith(f"loss.type: unknown loss {loss!r} {hint}"), e.value.lines


def test_open_instruct_loss_names_are_fsdpo_names() -> None:
    assert {"dpo", "dpo_norm", "simpo", "wpo"} <= set(LOSSES)
