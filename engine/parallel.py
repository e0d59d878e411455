"""One ordered `parallelize()`: activation checkpointing, compile, FSDP2, in that order.

The order is the documentation:
1. activation checkpointing wraps each decoder block (it must see the plain block);
2. `fully_shard` each block (its own all-gather / reduce-scatter unit), then the root, which
   owns what is left (embeddings, final norm, LM head);
3. compile each block after sharding it (FSDP's hooks stay outside the compiled graph).

Master weights stay fp32 and sharded; `MixedPrecisionPolicy` casts them to the compute dtype
for forward and backward and reduces gradients in fp32.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from engine.config import ParallelConfig
from engine.errors import UserError
from engine.model import decoder_blocks


def compute_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                parent.register_module(name, new)
                return
    raise ValueError("module not found under root")


def apply_activation_checkpointing(model: nn.Module) -> None:
    for block in decoder_blocks(model):
        _replace_module(model, block, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> None:
    dtype = compute_dtype(cfg, device)
    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32
    )
    for block in _fsdp_units(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    # The loss is already normalised by the pairs of the whole global batch, so gradients are
    # summed across ranks, not averaged (averaging would tie results to the world size).
    # Plain SUM collectives (gloo has no PREMUL_SUM), with no pre/post scaling.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks, or their activation-checkpoint wrappers when present."""
    blocks = decoder_blocks(model)
    wrappers = {
        id(m._checkpoint_wrapped_module): m
        for m in model.modules()
        if hasattr(m, "_checkpoint_wrapped_module")
    }
    return [wrappers.get(id(b), b) for b in blocks]


def apply_compile(model: nn.Module) -> None:
    if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
        raise UserError(
            "parallel.compile: torch.compile on CPU needs a C++ compiler (g++); install one or "
            "set parallel.compile=false"
        )
    for block in _fsdp_units(model):
        block.compile()


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> FSDPModule:
    """Shard `model` in place over `mesh`; FSDP moves each rank's shards to `device`."""
    if cfg.activation_checkpointing == "full":
        apply_activation_checkpointing(model)
    apply_fsdp(model, cfg, mesh, device)
    if cfg.compile:
        apply_compile(model)
    return model  # type: ignore[return-value]
