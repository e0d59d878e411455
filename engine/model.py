"""Load the Hugging Face causal LM and tokenizer named by the `[model]` table.

Master weights are always fp32 (mixed precision is FSDP's job, see parallel.py). A local folder
or a hub id both work; `trust_remote_code` is off unless the recipe asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from engine.config import LoraConfig, ModelConfig, is_local_path
from engine.errors import UserError, first_line
from engine.loading import parameters_on_meta, safetensors_index


def check_model_folder(path: str) -> None:
    """A path that looks local must be an existing folder with a config.json (a hub id passes)."""
    if not is_local_path(path):
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise UserError(f"model.path: {path} is not a folder (expected a Hugging Face model folder)")
        raise UserError(f"model.path: folder {path} not found")
    if not (folder / "config.json").is_file():
        raise UserError(f"model.path: {path} holds no config.json (expected a Hugging Face model folder)")


# a tokenizer's vocabulary: tokenizers' JSON, a sentencepiece or tiktoken model, BPE or WordPiece files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def build_tokenizer(cfg: ModelConfig, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer (pad = eos when it has none). A local folder without vocabulary
    files is an error here: transformers would build a near-empty tokenizer from config.json."""
    check_model_folder(cfg.path)
    folder = Path(cfg.path).expanduser()
    if (
        is_local_path(cfg.path)
        and not any((folder / name).is_file() for name in TOKENIZER_FILES)
        and not any(f.suffix in TOKENIZER_SUFFIXES for f in folder.iterdir())
    ):
        raise UserError(
            f"model.path: {cfg.path} holds no tokenizer files (expected tokenizer.json, or a "
            "sentencepiece tokenizer.model, or vocab.json + merges.txt, or vocab.txt); copy the "
            "tokenizer of the model into the folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.path, trust_remote_code=cfg.trust_remote_code, local_files_only=local_files_only
        )
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise UserError(f"model.path: cannot load a tokenizer from {cfg.path} ({first})") from None
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise UserError(
            f"model.path: the tokenizer in {cfg.path} turns text into no tokens (vocabulary missing)"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.path: the tokenizer in {cfg.path} has no eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_folder(
    path: str, download: bool = False, patterns: list[str] | None = None
) -> tuple[Path | None, str]:
    """(The local folder of `model.path`, how it was found), or (None, why not). A folder is
    itself; a hub id is its snapshot in the local Hugging Face cache, fetched (its files matching
    `patterns`) when `download` and not there yet."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder.resolve(), "folder"
    try:
        from huggingface_hub import snapshot_download

        found = snapshot_download(path, local_files_only=not download, allow_patterns=patterns)
        return Path(found).resolve(), "hub snapshot"
    except Exception:  # not in the local hub cache, not a repo id, offline
        return None, "hub id (no local snapshot)"


def sharded_weights_dir(cfg: ModelConfig) -> Path | None:
    """The local folder with the model's safetensors, for shard-by-shard loading; None when the
    weights must be loaded whole (random init, or only .bin/.pt files)."""
    if cfg.random_init:
        return None
    folder, _ = model_folder(cfg.path, download=True, patterns=["*.json", "*.safetensors"])
    if folder is None:
        return None
    try:
        index = safetensors_index(folder)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # a truncated file, a bad index
        first = first_line(e)
        raise UserError(f"model.path: cannot read the safetensors weights in {cfg.path} ({first})") from None
    return folder if index is not None else None


def build_model(
    cfg: ModelConfig, seed: int, defer_weights: bool = False, config_overrides: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The causal LM in fp32 on the CPU (parallelize() shards it). `config_overrides` set fields
    of its config before it is built (the bench's `--model-config`: with `random_init`).

    With `defer_weights`, parameters are created on the meta device and nothing is loaded:
    `engine.loading.materialize_and_load` fills each rank's shards after sharding.
    """
    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise UserError(f"model.path: cannot load a model config from {cfg.path} ({first})") from None
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise UserError(f"--model-config: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if cfg.disable_dropout:  # before the model is built: modules copy these at init
        disable_config_dropout(config)
    kwargs = dict(
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        dtype=torch.float32,
    )
    try:
        if defer_weights:
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        elif cfg.random_init:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, config=config, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        first = first_line(e)
        if "attention implementation" in first:  # e.g. Gemma 2 has no sdpa attention
            hint = '; set model.attn_implementation = "eager"' if cfg.attn_implementation != "eager" else ""
            raise UserError(f"model.attn_implementation: {first.split('. ')[0]}{hint}") from None
        raise UserError(f"model.path: cannot load model weights from {cfg.path} ({first})") from None
    model.config.use_cache = False
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, DROPOUT_LAYERS):
                module.p = 0.0
    return model


DROPOUT_LAYERS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def disable_config_dropout(config: PretrainedConfig) -> None:
    """Set every dropout probability of a transformers config (and of its sub-configs) to 0: the
    numeric fields named like `attention_dropout`, `resid_pdrop` or `layerdrop`. Some models copy
    them into their modules at init, some read the config in every forward."""
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            disable_config_dropout(value)
        elif is_dropout_field(key, value):
            setattr(config, key, 0.0)


def is_dropout_field(key: object, value: object) -> bool:
    """Whether a config field is a dropout probability (the one rule for disabling and restoring)."""
    if not isinstance(key, str):
        return False  # e.g. the integer keys of id2label
    named = "dropout" in key or key.endswith("pdrop") or "layerdrop" in key
    return named and isinstance(value, int | float) and not isinstance(value, bool)


def restore_config_dropout(exported: dict, source: dict) -> None:
    """Put the source config's dropout probabilities back into an exported config dict (training
    ran with them at 0; the exported model should keep the values it came with)."""
    for key, value in exported.items():
        if isinstance(value, dict) and isinstance(source.get(key), dict):
            restore_config_dropout(value, source[key])
        elif is_dropout_field(key, value) and is_dropout_field(key, source.get(key)):
            exported[key] = source[key]


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters (seeded, so every rank starts identical).

    Adapters start as the identity (B = 0), so the initial policy is the base model; only adapter
    (and `modules_to_save`) parameters require gradients.
    """
    import peft

    torch.manual_seed(seed)
    try:
        return peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=cfg.target_modules,
                modules_to_save=cfg.modules_to_save or None,
                bias=cfg.bias,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as e:
        raise UserError(f"lora.target_modules: {e}") from None


def build_policy(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    seed: int,
    defer_weights: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model that is trained: the causal LM (`build_model`), with LoRA adapters when enabled
    (adapters are always created for real, seeded, even when the base weights are deferred)."""
    model = build_model(model_cfg, seed, defer_weights, config_overrides)
    if not lora_cfg.enabled:
        return model
    model = apply_lora(model, lora_cfg, seed)
    if defer_weights:  # peft put the adapters on the base layers' (meta) device: create them here
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    module.lora_A[adapter].to_empty(device="cpu")
                    module.lora_B[adapter].to_empty(device="cpu")
                    module.reset_lora_parameters(adapter, init_lora_weights=True)
    return model


def adapter_description(lora_cfg: LoraConfig) -> str | None:
    """What the reference cache key records about adapters (None without LoRA)."""
    if not lora_cfg.enabled:
        return None
    return f"lora r={lora_cfg.r} alpha={lora_cfg.alpha} targets={lora_cfg.target_modules} save={lora_cfg.modules_to_save}"


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found from the model's `_no_split_modules` class names.

    This is how FSDP and activation checkpointing find their units for any architecture, without
    model-specific attribute paths.
    """
    names: set[str] = set()
    for module in model.modules():  # the HF model may sit inside wrappers (ours, peft's)
        names.update(getattr(module, "_no_split_modules", None) or [])
    # fully_shard renames classes to FSDP<Name>, so match over the class hierarchy
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise UserError(
            f"model.path: cannot find the decoder blocks of {type(model).__name__} "
            "(no _no_split_modules declared)"
        )
    return blocks


def save_tokenizer_and_generation_config(
    tokenizer: PreTrainedTokenizerBase, model_path: str, out_dir: Path
) -> None:
    """The tokenizer, and the base model's generation config (or one from its model config) with
    `eos_token_id` = the tokenizer's EOS, which closed every trained completion, then the model
    config's declared EOS ids. Ids the base generation config adds (often its pad or bos) are
    not kept, so generation stops where training taught the model to stop."""
    tokenizer.save_pretrained(out_dir)
    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(model_path)
    except OSError:
        return
    try:
        generation = transformers.GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation = transformers.GenerationConfig.from_dict(
            {k: config[k] for k in ("bos_token_id", "pad_token_id") if config.get(k) is not None}
        )
    declared = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
    declared = declared if isinstance(declared, list) else [] if declared is None else [declared]
    eos = list(dict.fromkeys([tokenizer.eos_token_id, *declared]))
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation.save_pretrained(out_dir)
