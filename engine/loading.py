"""Loading pretrained weights at scale: every rank reads only its own shards.

The model is built with its parameters on the meta device (no memory, no random init), sharded
with `fully_shard`, given empty local storage, and then each parameter's local shard is read
straight from the safetensors files with a slice, so no rank ever holds the whole model in host
or device memory. Buffers (e.g. rotary frequencies) are computed normally on the CPU.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from engine.errors import UserError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this context, new modules register their parameters on the meta device (their
    buffers stay real), so building a 70B model costs no memory and no init time."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def safetensors_index(model_dir: Path) -> dict[str, Path] | None:
    """Map each tensor name to its safetensors file, or None if the folder has none."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (drop the wrapper and checkpoint-wrapper parts)."""
    name = name.removeprefix("causal_lm.").replace("_checkpoint_wrapped_module.", "")
    name = name.replace("base_model.model.", "").replace(".base_layer", "")
    return name.replace(".modules_to_save.default", "").replace(".original_module", "")


def materialize_and_load(
    model: nn.Module, model_dir: Path, device: torch.device, tied: dict[str, str]
) -> None:
    """Give meta parameters local storage on `device` and fill each rank's shard from disk.

    Parameters that were already real (LoRA adapters, created and seeded normally) and all
    buffers keep their values.
    """
    keep = {
        name: (t.to_local() if isinstance(t, DTensor) else t).detach().clone()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if not t.is_meta
    }
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in keep:
                (tensor.to_local() if isinstance(tensor, DTensor) else tensor).copy_(keep[name])
    index = safetensors_index(model_dir)
    assert index is not None
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name, param in model.named_parameters():
            if name in keep:
                continue
            key = _hf_name(name)
            key = key if key in index else tied.get(key, key)
            if key not in index:
                raise UserError(f"model.path: {model_dir} has no weight {key!r}")
            path = index[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            view = handles[path].get_slice(key)  # type: ignore[attr-defined]
            if isinstance(param, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements
                )
                local = param.to_local()
                if local.numel() == 0:
                    continue
                slices = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                local.copy_(view[slices])
            else:
                param.copy_(view[:])
