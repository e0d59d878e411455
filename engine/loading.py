"""Loading pretrained weights at scale: every rank reads only its own shards.

The model is built with its parameters on the meta device (no memory, no random init), sharded
with `fully_shard`, given empty local storage, and then each parameter's local shard is read
straight from the safetensors files with a slice, so no rank ever holds the whole model in host
or device memory. Buffers (e.g. rotary frequencies) are computed normally on the CPU.

Which file key holds which parameter is transformers' own rule (`checkpoint_sources`), so any
architecture `from_pretrained` loads loads here too, and `hf_name` is the one mapping from the
engine's parameter names to transformers', shared with the export.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

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


WRAPPER_PREFIX = "causal_lm."  # SequenceLogprobs' attribute holding the causal LM


def hf_name(name: str) -> str:
    """An engine parameter or state-dict name -> the transformers model's own name for it: without
    our wrapper's `causal_lm.`, activation checkpointing's and peft's parts (a LoRA base layer,
    a `modules_to_save` copy and its original all name the pretrained weight they start from).
    The one rule for loading and export."""
    name = name.removeprefix(WRAPPER_PREFIX).replace("_checkpoint_wrapped_module.", "")
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def pretrained_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside `model` (ours, peft's or FSDP's wrappers around it)."""
    return next(m for m in model.modules() if isinstance(m, PreTrainedModel))


def checkpoint_sources(
    hf_model: PreTrainedModel, names: set[str], file_keys: Iterable[str], read: Callable[[str], Tensor]
) -> dict[str, str | WeightConverter]:
    """Where each of the model's weights (`names`, as `hf_name` gives them) is in a checkpoint
    with `file_keys`: a file key read as is, or a transformers converter (given `read` for the
    whole source tensors) whose `convert` builds it and possibly its siblings.

    This is `from_pretrained`'s own rule: the model class's conversion mapping renames saved keys
    (GPT-NeoX's `embed_out` -> `lm_head`, legacy names) or builds one weight from several
    (Mixtral's per-expert matrices -> fused experts), `base_model_prefix` is added or dropped (a
    checkpoint of the bare decoder), and a tied weight the checkpoint lacks is read from the
    weight it is tied to (`all_tied_weights_keys`)."""
    conversions = get_model_conversion_mapping(hf_model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    known = dict.fromkeys(names, True)  # what rename_source_key looks names up in
    prefix = hf_model.base_model_prefix
    sources: dict[str, str | WeightConverter] = {}
    for key in sorted(file_keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if name not in known and key in known:  # as from_pretrained: the key was right as it was
            name, pattern = rename_source_key(key, [], [], prefix, known)
        if name not in known:
            continue  # not a weight of this model (from_pretrained ignores it too)
        if pattern is None:
            sources[name] = key
        else:
            converter = sources.setdefault(name, copy.deepcopy(by_pattern[pattern]))
            converter.add_tensor(name, key, pattern, functools.partial(read, key))
    for target, source in hf_model.all_tied_weights_keys.items():
        if target in known and target not in sources and isinstance(sources.get(source), str):
            sources[target] = sources[source]
    return sources


def _copy_shard(param: Tensor, name: str, source: Tensor | object, model_dir: Path) -> None:
    """Fill `param`'s local shard from `source` (a whole tensor or a safetensors slice)."""
    shape = tuple(source.get_shape() if hasattr(source, "get_shape") else source.shape)
    if shape != tuple(param.shape):
        raise UserError(
            f"model.path: weight {name!r} in {model_dir} has shape {list(shape)}, the model "
            f"(config.json) expects {list(param.shape)}"
        )
    if not isinstance(param, DTensor):
        param.copy_(source[...])
        return
    local_shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    local = param.to_local()
    if local.numel():
        local.copy_(source[tuple(slice(o, o + s) for o, s in zip(offset, local_shape))])


def materialize_and_load(model: nn.Module, model_dir: Path, device: torch.device) -> None:
    """Give meta parameters local storage on `device` and fill each rank's shard from disk,
    with the file keys `checkpoint_sources` finds for them.

    Parameters that were already real (LoRA adapters, created and seeded normally) and all
    buffers keep their values. Renamed keys are read slice by slice; a weight that transformers
    converts from several saved tensors is read whole (one at a time), converted, then sliced.
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
    params: dict[str, list[Tensor]] = {}
    for name, param in model.named_parameters():
        if name not in keep:
            params.setdefault(hf_name(name), []).append(param)
    names = set(params) | {hf_name(name) for name, _ in model.named_buffers()}
    hf_model = pretrained_model(model)
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():

        def handle(key: str) -> object:
            path = index[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path]

        sources = checkpoint_sources(hf_model, names, index, lambda key: handle(key).get_tensor(key))
        loaded: set[str] = set()
        for name, source in sources.items():
            if isinstance(source, str):
                tensors = {name: handle(source).get_slice(source)}
            else:
                tensors = source.convert(name, model=hf_model, config=hf_model.config)
            for target, value in tensors.items():
                for param in params.get(target, []):
                    _copy_shard(param, target, value[0] if isinstance(value, list) else value, model_dir)
                loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise UserError(f"model.path: {model_dir} has no weight {missing[0]!r} ({len(missing)} missing)")


def saved_weights(hf_model: PreTrainedModel, name: str, tensor: Tensor) -> dict[str, Tensor]:
    """One weight of `hf_model` (named as `hf_name` gives it) under the file keys
    `save_pretrained` writes: transformers reverts its load-time conversion mapping (GPT-NeoX's
    `lm_head` is saved as `embed_out`, Mixtral's fused experts as one matrix per expert)."""
    return revert_weight_conversion(hf_model, {name: tensor})
