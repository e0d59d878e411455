"""Shard-by-shard loading of pretrained safetensors onto a meta-built, FSDP-sharded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine.config import LoraConfig, ModelConfig, ParallelConfig
from engine.data import collate
from engine.forward import SequenceLogprobs, policy_logps
from engine.loading import materialize_and_load
from engine.model import build_policy, sharded_weights_dir
from engine.parallel import parallelize
from tests.conftest import base_tables, data_mesh, run_training, write_recipe


def test_meta_built_sharded_model_equals_from_pretrained(tiny_model_dir: Path, world) -> None:
    from transformers import AutoModelForCausalLM

    from engine.config import DataConfig, DataSource
    from engine.data import build_dataset
    from engine.model import build_tokenizer
    from tests.conftest import ASSETS

    cfg = ModelConfig(path=str(tiny_model_dir))
    weights = sharded_weights_dir(cfg)
    assert weights == tiny_model_dir
    lm = build_policy(cfg, LoraConfig(), seed=0, defer_weights=True)
    assert all(p.is_meta for p in lm.parameters())  # nothing materialised before sharding
    model = parallelize(
        SequenceLogprobs(lm), ParallelConfig(activation_checkpointing="full"), data_mesh(world), world.device
    )
    materialize_and_load(model, weights, world.device)
    plain = SequenceLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    tokenizer = build_tokenizer(cfg)
    data = build_dataset(
        [DataSource(path=str(ASSETS / "demo_eval.jsonl"), count=8)], tokenizer, DataConfig(max_length=64), 0
    )
    batch = collate(data, list(range(8)))
    with torch.no_grad():
        got = policy_logps("concatenated", model, batch, tokenizer.pad_token_id, world.device)
        expected = policy_logps("concatenated", plain, batch, tokenizer.pad_token_id, world.device)
    assert torch.equal(got.chosen_logps, expected.chosen_logps)
    assert torch.equal(got.rejected_logps, expected.rejected_logps)


@pytest.mark.slow
def test_two_ranks_materialise_about_half_of_one_rank(tmp_path: Path, small_data: dict) -> None:
    """Peak RSS added by loading a 45M-parameter model: each of 2 ranks well under 1 rank."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import ASSETS

    config = LlamaConfig(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(model_dir)
    tables = base_tables(model_dir, small_data, tmp_path / "unused")
    tables["training"].update(max_steps=1, global_batch_size=2, micro_batch_size=1)
    tables["loss"] = {"type": "simpo"}
    tables["data"]["eval"] = []
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / "r.toml", tables)
    added = {}
    for nproc in (1, 2):
        proc = run_training(recipe, [f"job.output_dir={tmp_path / str(nproc)}"], nproc=nproc, forked=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = re.findall(
            r"\[rank (\d)\] loaded .* peak RSS ([\d.]+) GiB \(before loading ([\d.]+) GiB\)", proc.stdout
        )
        assert len(found) == nproc
        added[nproc] = [float(peak) - float(before) for _, peak, before in found]
    model_gib = 45.5e6 * 4 / 2**30
    assert added[1][0] >= 0.8 * model_gib  # one rank holds all of it
    assert all(a < 0.75 * added[1][0] for a in added[2]), added
