"""Export a model as a Hugging Face folder (safetensors, config, tokenizer, generation config).

Two entry points share one writer:
- `export_hf(model, ...)` at the end of training: the full state dict is gathered to rank 0 in
  CPU memory and loaded into a model built on the meta device (no second allocation).
- `python -m engine.export CHECKPOINT_DIR OUT_DIR`: turns any `step-N` checkpoint into a folder
  without a training run (one process; reads the recipe saved inside the checkpoint).

A folder appears under its final name only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from engine.config import ExportConfig, LoraConfig
from engine.model import apply_lora, save_tokenizer_and_generation_config

WRAPPER_PREFIX = "causal_lm."


def full_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights under Hugging Face names on rank 0 (empty on other ranks)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}


def write_hf_folder(
    state: dict[str, torch.Tensor],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    out_dir: Path,
    export_cfg: ExportConfig,
    lora_cfg: LoraConfig,
) -> None:
    """Write `out_dir` from a full state dict (keys as the trained model names them)."""
    if lora_cfg.enabled and export_cfg.lora != "adapter":
        # merging writes into the base weights; on one CPU rank the gathered state dict can share
        # storage with the live model, which must stay as trained
        state = {k: v.clone() for k, v in state.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if lora_cfg.enabled:
            model = apply_lora(model, lora_cfg, seed=0)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export: parameters missing from the state dict: {missing[:5]}")
    staging = out_dir.with_name(out_dir.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    if lora_cfg.enabled:
        model.peft_config["default"].base_model_name_or_path = model_path
        if export_cfg.lora == "adapter":
            model.save_pretrained(staging)
        else:
            if export_cfg.lora == "both":
                model.save_pretrained(staging / "adapter")
            model = model.merge_and_unload()
    if not (lora_cfg.enabled and export_cfg.lora == "adapter"):
        model.config.use_cache = True
        model.save_pretrained(staging, max_shard_size=export_cfg.max_shard_size)
    save_tokenizer_and_generation_config(tokenizer, model_path, staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def export_hf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
    out_dir: Path,
    export_cfg: ExportConfig,
    lora_cfg: LoraConfig,
    is_main: bool,
) -> None:
    """Write `out_dir` from the sharded training model. Collective: call on every rank."""
    state = full_hf_state_dict(model)
    if is_main:
        write_hf_folder(state, model.causal_lm.config, tokenizer, model_path, out_dir, export_cfg, lora_cfg)
    if dist.is_initialized():
        dist.barrier()


def export_checkpoint(checkpoint_dir: Path, out_dir: Path) -> None:
    """Turn a `step-N` checkpoint into a Hugging Face folder, in this one process."""
    import torch.distributed.checkpoint as dcp

    from engine.checkpoint import COMPLETE
    from engine.config import load_config
    from engine.errors import UserError
    from engine.forward import SequenceLogprobs
    from engine.model import build_policy, build_tokenizer

    if not (checkpoint_dir / COMPLETE).is_file():
        raise UserError(f"{checkpoint_dir}: not a complete fsdpo checkpoint")
    if out_dir.exists():
        raise UserError(f"{out_dir}: already exists; choose a new folder")
    cfg = load_config(checkpoint_dir / "recipe.toml")
    tokenizer = build_tokenizer(cfg.model)
    model = SequenceLogprobs(build_policy(cfg.model, cfg.lora, cfg.job.seed))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    weights = {k.removeprefix(WRAPPER_PREFIX): v for k, v in state["model"].items()}
    write_hf_folder(weights, model.causal_lm.config, tokenizer, cfg.model.path, out_dir, cfg.export, cfg.lora)


def main(argv: list[str]) -> int:
    from engine.errors import UserError

    if len(argv) != 2:
        print("usage: python -m engine.export CHECKPOINT_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        export_checkpoint(Path(argv[0]), Path(argv[1]))
    except UserError as e:
        print(f"fsdpo: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
