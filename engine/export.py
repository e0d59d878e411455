"""Export the trained model as a Hugging Face folder (safetensors, config, tokenizer).

Weights are streamed: one parameter at a time is gathered from its shards (every rank takes
part), rank 0 moves it to host memory and writes a safetensors file whenever
`export.max_shard_size` is reached, so no rank ever holds more than one file's worth of the
model, whatever its size. With LoRA, merged weights are computed on the fly as
W + (alpha / r) B A per adapted layer, and the adapter folder is written in peft's format.

Two entry points share this writer:
- `export_hf(model, ...)` at the end of training (collective: call on every rank);
- `python -m engine.export CHECKPOINT_DIR OUT_DIR`: any `step-N` checkpoint to a folder, in one
  process, without a training run (reads the recipe saved inside the checkpoint).

A folder appears under its final name only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from engine.config import ExportConfig, LoraConfig, ModelConfig, parse_size
from engine.distributed import from_main
from engine.errors import UserError
from engine.loading import WRAPPER_PREFIX, hf_name, pretrained_model, saved_weights
from engine.model import restore_config_dropout, save_tokenizer_and_generation_config
from engine.run_dir import RunDir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def full_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole unsharded state on rank 0 (empty elsewhere), keyed as the trained model names it.
    For tests and small models; the export itself streams (see `export_hf`)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """Collective for DTensors: the whole tensor (on every rank), as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _merged_weights(
    state: dict[str, torch.Tensor], lora_cfg: LoraConfig, hf_model: PreTrainedModel, adapters: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(file key, full tensor) for every weight of the exported model, keyed as `save_pretrained`
    keys `hf_model`'s, in a fixed order (the same on every rank, since each gather is
    collective), adapters merged in; with `adapters=False`, the base model the adapters were
    trained on (frozen weights, `modules_to_save` originals)."""
    tied = hf_model.all_tied_weights_keys  # target -> source, as transformers ties them
    scale = lora_cfg.alpha / lora_cfg.r
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue  # folded into their base layer below
        trained_copy = name.replace(".original_module.", ".modules_to_save.default.")
        if adapters and ".original_module." in name and trained_copy in state:
            continue  # the trained copy in modules_to_save replaces it
        if not adapters and ".modules_to_save." in name:
            continue  # the base keeps the original module
        name_in_model = hf_name(name)
        if name_in_model in tied:
            continue  # the weight it is tied to is written; transformers re-ties on load
        value = _full(tensor)
        if adapters and ".base_layer.weight" in name and lora_cfg.enabled:
            prefix = name.removesuffix(".base_layer.weight")
            a, b = (
                _full(state[f"{prefix}.lora_A.default.weight"]),
                _full(state[f"{prefix}.lora_B.default.weight"]),
            )
            value = value + scale * (b.to(value.dtype) @ a.to(value.dtype))
        yield from saved_weights(hf_model, name_in_model, value).items()


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors files of at most `max_bytes` each, plus the index."""

    def __init__(self, folder: Path, max_bytes: int, dtype: torch.dtype) -> None:
        self.folder, self.max_bytes, self.dtype = folder, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def _flush(self) -> None:
        index = len(self.files)
        save_file(self.pending, str(self.folder / f"part-{index}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        if len(self.files) == 1:
            (self.folder / "part-0.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / f"part-{i}.safetensors").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        for f in self.folder.glob("model-*.safetensors"):
            total += f.stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _export_dtype(export_cfg: ExportConfig, config: object) -> torch.dtype:
    if export_cfg.dtype != "auto":
        return DTYPES[export_cfg.dtype]
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    return DTYPES.get(name, torch.float32)


def _write_adapter(
    model: nn.Module, state: dict[str, torch.Tensor], folder: Path, base_model: str, is_main: bool
) -> None:
    """The PEFT adapter folder (adapter_config.json + adapter_model.safetensors), whose
    `base_model_name_or_path` is `base_model` (an absolute folder or a hub id)."""
    from peft.utils import get_peft_model_state_dict

    trained = {
        k.removeprefix(WRAPPER_PREFIX): _full(v)
        for k, v in state.items()
        if ".lora_" in k or ".modules_to_save." in k
    }
    if not is_main:
        return
    peft_model = model.causal_lm
    adapter_state = get_peft_model_state_dict(peft_model, state_dict={k: v.cpu() for k, v in trained.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in adapter_state.items()}, str(folder / "adapter_model.safetensors")
    )
    peft_config = peft_model.peft_config["default"]
    peft_config.base_model_name_or_path = base_model
    peft_config.inference_mode = True
    peft_config.save_pretrained(str(folder))


def _write_model(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    folder: Path,
    model_cfg: ModelConfig,
    export_cfg: ExportConfig,
    lora_cfg: LoraConfig,
    is_main: bool,
    adapters: bool = True,
) -> None:
    """Collective: the model's safetensors (streamed, see the module docstring) and config.json
    into `folder` (merged adapters, or the base model with `adapters=False`)."""
    config = model.causal_lm.config
    dtype = _export_dtype(export_cfg, config)
    writer = (
        ShardedSafetensorsWriter(folder, parse_size(export_cfg.max_shard_size), dtype) if is_main else None
    )
    if writer is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in _merged_weights(state, lora_cfg, pretrained_model(model), adapters):
        if writer is not None:
            writer.add(name, tensor)
    if writer is None:
        return
    writer.close()
    exported = config.to_dict()
    exported.update(use_cache=True, dtype=str(dtype).removeprefix("torch."))
    exported.pop("_name_or_path", None)
    if model_cfg.disable_dropout:  # training ran without dropout; the model keeps its own values
        with contextlib.suppress(OSError, ValueError):
            source = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
            restore_config_dropout(exported, source.to_dict())
    base = model.causal_lm.get_base_model() if lora_cfg.enabled else model.causal_lm
    exported["architectures"] = exported.get("architectures") or [type(base).__name__]
    type(config).from_dict(exported).save_pretrained(folder)


def export_hf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    model_cfg: ModelConfig,
    out_dir: Path,
    export_cfg: ExportConfig,
    lora_cfg: LoraConfig,
    is_main: bool,
    run_dir: RunDir | None = None,
) -> None:
    """Write `out_dir` as a from_pretrained-loadable folder (or a PEFT adapter folder with
    `export.lora = "adapter"`). Collective under torch.distributed: call on every rank.

    An adapter names its base model by `model.path`; a random-init base exists nowhere else, so
    it is written beside the adapter (`base_model/`) and named by its absolute final path.
    Inside a run's output folder (`run_dir`), the previous `out_dir` is replaced only if fsdpo wrote
    every file in it; standalone, `out_dir` and its staging folder must not exist."""
    state = get_model_state_dict(model)  # sharded: DTensors, nothing gathered yet
    staging = out_dir.with_name(out_dir.name + ".incomplete")
    error: UserError | None = None
    if is_main:
        try:
            if run_dir is not None:
                run_dir.check_replaceable(out_dir, "the export")
                run_dir.remove(staging)  # a crashed export's leftovers, if the manifest has them
                run_dir.claim(staging)
            elif staging.exists():
                raise UserError(
                    f"{staging}: exists (an interrupted export?); remove it or choose another folder"
                )
            staging.mkdir(parents=True)
        except UserError as e:
            error = e
    error = from_main(error)  # every rank stops alike, before the first collective gather
    if error is not None:
        raise error
    adapter_only = lora_cfg.enabled and export_cfg.lora == "adapter"
    if lora_cfg.enabled and export_cfg.lora in ("adapter", "both"):
        adapter_dir = Path() if adapter_only else Path("adapter")
        base_model = model_cfg.path
        if model_cfg.random_init:
            _write_model(
                model,
                state,
                staging / adapter_dir / "base_model",
                model_cfg,
                export_cfg,
                lora_cfg,
                is_main,
                adapters=False,
            )
            base_model = str((out_dir / adapter_dir / "base_model").resolve())
        _write_adapter(model, state, staging / adapter_dir, base_model, is_main)
    if not adapter_only:
        _write_model(model, state, staging, model_cfg, export_cfg, lora_cfg, is_main)
    if is_main:
        save_tokenizer_and_generation_config(tokenizer, model_cfg.path, staging)
        if run_dir is not None:
            run_dir.publish(staging, out_dir)
        else:
            staging.rename(out_dir)
    if dist.is_initialized():
        dist.barrier()


def export_checkpoint(checkpoint_dir: Path, out_dir: Path) -> None:
    """Turn a `step-N` checkpoint into a Hugging Face folder, in this one process."""
    import torch.distributed.checkpoint as dcp

    from engine.checkpoint import COMPLETE, STATE_OPTIONS
    from engine.forward import SequenceLogprobs
    from engine.model import build_policy, build_tokenizer
    from engine.recipe import load_config

    if not (checkpoint_dir / COMPLETE).is_file():
        raise UserError(f"{checkpoint_dir}: not a complete fsdpo checkpoint")
    if out_dir.exists():
        raise UserError(f"{out_dir}: already exists; choose a new folder")
    cfg = load_config(checkpoint_dir / "recipe.toml")
    tokenizer = build_tokenizer(cfg.model)
    model = SequenceLogprobs(build_policy(cfg.model, cfg.lora, cfg.job.seed))
    state = {"model": get_model_state_dict(model, options=STATE_OPTIONS)}
    dcp.load(state, checkpoint_id=str(checkpoint_dir), no_dist=True)
    model.load_state_dict(state["model"], strict=False)
    export_hf(model, tokenizer, cfg.model, out_dir, cfg.export, cfg.lora, is_main=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m engine.export CHECKPOINT_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        export_checkpoint(Path(argv[0]), Path(argv[1]))
    except UserError as e:
        for line in e.lines:
            print(f"fsdpo: error: {line}", file=sys.stderr)
        return 2
    print(f"exported {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
