"""Export the trained model as a Hugging Face folder (safetensors, config, tokenizer).

The full state dict is gathered to rank 0 in CPU memory, loaded into a model built on the meta
device (no second allocation of random weights) and written with `save_pretrained`. The folder
appears under its final name only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from engine.model import save_tokenizer_and_generation_config

WRAPPER_PREFIX = "causal_lm."


def full_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights under Hugging Face names on rank 0 (empty on other ranks)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}


def export_hf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    out_dir: Path,
    max_shard_size: str,
    is_main: bool,
) -> None:
    """Write `out_dir` as a from_pretrained-loadable folder. Collective: call on every rank."""
    state = full_hf_state_dict(model)
    if is_main:
        config = model.causal_lm.config
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        hf_model.load_state_dict(state, strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            hf_model.tie_weights()
        missing = [n for n, p in hf_model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"export: parameters missing from the state dict: {missing[:5]}")
        staging = out_dir.with_name(out_dir.name + ".incomplete")
        shutil.rmtree(staging, ignore_errors=True)
        hf_model.config.use_cache = True
        hf_model.save_pretrained(staging, max_shard_size=max_shard_size)
        save_tokenizer_and_generation_config(tokenizer, model_path, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    if dist.is_initialized():
        dist.barrier()
