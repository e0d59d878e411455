"""One ordered `parallelize()`: activation checkpointing, FSDP2, compile, in that order.

The order is the documentation:
1. activation checkpointing wraps decoder blocks (it must see the plain block);
2. `fully_shard` each block (its own all-gather / reduce-scatter unit), then the root, which
   owns what is left (embeddings, final norm, LM head);
3. compile each block after sharding it (FSDP's hooks stay outside the compiled graph).

Sharding strategies are all FSDP2 over a device mesh, named as users of DeepSpeed and FSDP1 know
them:

| `parallel.sharding` | DeepSpeed | FSDP1              | mesh                          | reshard after forward |
|---------------------|-----------|--------------------|-------------------------------|-----------------------|
| `full`              | ZeRO-3    | FULL_SHARD         | 1-D (shard over all ranks)    | yes                   |
| `grad_op`           | ZeRO-2    | SHARD_GRAD_OP      | 1-D (shard over all ranks)    | no                    |
| `hybrid`            | ZeRO++ hpZ| HYBRID_SHARD       | 2-D (replicate x shard)       | yes                   |
| `none`              | ZeRO-0    | NO_SHARD / DDP     | 2-D (replicate x 1)           | -                     |

Master weights stay fp32 and sharded; `MixedPrecisionPolicy` casts them to the compute dtype
for forward and backward and reduces gradients in fp32.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from engine.config import ParallelConfig
from engine.distributed import log
from engine.errors import UserError
from engine.model import decoder_blocks


def compute_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def reduce_dtype(cfg: ParallelConfig) -> torch.dtype:
    """The dtype FSDP reduce-scatters gradients in (`parallel.reduce_dtype`)."""
    return torch.bfloat16 if cfg.reduce_dtype == "bf16" else torch.float32


def mesh_shape(
    parallel: ParallelConfig, world_size: int, ranks_per_node: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, dimension names) of the device mesh `build_mesh` makes for `sharding` (the dry run prints it)."""
    if parallel.sharding in ("full", "grad_op"):
        return (world_size,), ("shard",)
    if parallel.sharding == "none":
        return (world_size, 1), ("replicate", "shard")
    replicas = parallel.replicate_degree or max(1, world_size // max(1, ranks_per_node))
    if world_size % replicas:
        raise UserError(
            f"parallel.replicate_degree={replicas} must divide the {world_size} ranks "
            '(parallel.sharding = "hybrid")'
        )
    return (replicas, world_size // replicas), ("replicate", "shard")


def shard_size(parallel: ParallelConfig, world_size: int, ranks_per_node: int) -> int:
    """Ranks that one copy of the sharded state is split over."""
    shape, _ = mesh_shape(parallel, world_size, ranks_per_node)
    return shape[-1]


def build_mesh(cfg: ParallelConfig, world_size: int, ranks_per_node: int, device_type: str) -> DeviceMesh:
    """The data-parallel mesh for `cfg.sharding` (see the table in this module's docstring); its
    shape is `mesh_shape`'s."""
    shape, names = mesh_shape(cfg, world_size, ranks_per_node)
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def reshard_after_forward(cfg: ParallelConfig) -> bool:
    if cfg.reshard_after_forward != "auto":
        return bool(cfg.reshard_after_forward)
    return cfg.sharding != "grad_op"


def defers_gradient_sync(cfg: ParallelConfig) -> bool:
    """Whether gradients are reduced only on the last micro-batch of a step."""
    if cfg.gradient_sync == "auto":
        return cfg.sharding == "none"
    return cfg.gradient_sync == "last_micro_batch"


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                parent.register_module(name, new)
                return
    raise ValueError("module not found under root")


# Op outputs selective recompute keeps (torchtitan's policy): the matmuls and attention, whose
# recomputation is the expensive part; everything else in a block is recomputed in backward.
# Attention comes as aten's SDPA kernels, torch's varlen op and our segment-attention op (the
# packed modes under compile); names absent from this torch are skipped.
_SAVED_OP_NAMES = (
    ("aten", "mm"),
    ("aten", "addmm"),
    ("aten", "bmm"),
    ("aten", "_scaled_dot_product_efficient_attention"),
    ("aten", "_scaled_dot_product_flash_attention"),
    ("aten", "_scaled_dot_product_cudnn_attention"),
    ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
    ("aten", "_flash_attention_forward"),
    ("aten", "_efficient_attention_forward"),
    ("torch_attn", "_varlen_attn"),
    ("fsdpo", "segment_attention"),
)


def _saved_ops() -> set:
    import engine.attention  # noqa: F401  (registers fsdpo::segment_attention)

    with contextlib.suppress(ImportError):  # registers torch_attn::_varlen_attn where it exists
        import torch.nn.attention.varlen
    found = set()
    for namespace, name in _SAVED_OP_NAMES:
        with contextlib.suppress(AttributeError, RuntimeError):
            found.add(getattr(getattr(torch.ops, namespace), name).default)
    return found


SAVED_OPS = _saved_ops()


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Wrap every `every`-th decoder block: `full` recomputes the whole block in backward,
    `selective` only the ops outside `SAVED_OPS`."""
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    for index, block in enumerate(decoder_blocks(model)):
        if index % every == 0:
            wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra)
            _replace_module(model, block, wrapped)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks, or their activation-checkpoint wrappers when present."""
    blocks = decoder_blocks(model)
    wrappers = {
        id(m._checkpoint_wrapped_module): m
        for m in model.modules()
        if hasattr(m, "_checkpoint_wrapped_module")
    }
    return [wrappers.get(id(b), b) for b in blocks]


def edge_units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(input side, output side) of the decoder, each sharded as one FSDP unit, as torchtitan does:
    the input side is the input embedding and the decoder's other parameter-holding children
    registered before the blocks (GPT-2's position embedding); the output side is those registered
    after the blocks (the final norm) plus the LM head. Both empty when the head shares its weight
    with the input embedding (tied), which one unit must then hold: the root."""
    causal_lm = model.causal_lm if hasattr(model, "causal_lm") else model
    embedding, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return [], []
    decoder = causal_lm.get_decoder()
    first_block = decoder_blocks(decoder)[0]
    before: list[nn.Module] = []
    after: list[nn.Module] = []
    side = before
    for child in decoder.children():
        if any(m is first_block for m in child.modules()):
            side = after  # the container of the blocks: what follows runs after them
            continue
        if any(True for _ in child.parameters()):
            side.append(child)
    if not any(m is embedding for m in before):
        before.insert(0, embedding)
    return before, [*after, head]


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> None:
    """FSDP units as torchtitan lays them out: the input embedding, each decoder block, and the
    final norm with the LM head each all-gather and reduce-scatter on their own; the root keeps
    what is left (nothing, or tied embeddings). The output unit stays gathered from forward to
    backward (backward needs it first, and the chunked head calls it once per chunk), and each
    block prefetches the next one's parameters (the previous one's in backward)."""
    dtype = compute_dtype(cfg, device)
    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype,
        reduce_dtype=reduce_dtype(cfg),
    )
    offload: OffloadPolicy = OffloadPolicy()
    if cfg.cpu_offload:
        if device.type == "cuda":
            offload = CPUOffloadPolicy()
        else:
            log("parallel.cpu_offload: this run is on the CPU already; nothing to offload")
    reshard = reshard_after_forward(cfg)

    def shard(module: nn.Module | list[nn.Module], reshard_after: bool) -> None:
        fully_shard(
            module, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard_after
        )

    input_side, output_side = edge_units(model)
    blocks = _blocks(model)
    if input_side:
        shard(input_side, reshard)
    for block in blocks:
        shard(block, reshard)
    if output_side:
        shard(output_side, False)
    shard(model, reshard)
    for previous, block in itertools.pairwise(blocks):
        previous.set_modules_to_forward_prefetch([block])
        block.set_modules_to_backward_prefetch([previous])
    # The loss is already normalised by the pairs of the whole global batch, so gradients are
    # summed across ranks, not averaged (averaging would tie results to the world size), with
    # plain SUM collectives (gloo has no PREMUL_SUM) and no pre/post scaling.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def check_compiler(cfg: ParallelConfig, device_type: str) -> None:
    """With `parallel.compile`, the compiler torch.compile's Inductor needs on this device, looked
    for before any weights load: a C compiler on CUDA (Triton builds its kernel launchers with it),
    a C++ compiler on CPU (Inductor's CPU kernels)."""
    if not cfg.compile:
        return
    if device_type == "cuda":
        names, what = (os.environ.get("CC"), "cc", "gcc", "clang"), "a C compiler (cc/gcc/clang, or $CC)"
    else:
        names, what = (
            (os.environ.get("CXX"), "c++", "g++", "clang++"),
            "a C++ compiler (g++/clang++, or $CXX)",
        )
    if not any(name and shutil.which(name) for name in names):
        raise UserError(
            f"parallel.compile: torch.compile on {device_type} needs {what}; install one "
            "(e.g. apt-get install g++) or set parallel.compile=false"
        )


def apply_compile(model: nn.Module) -> None:
    """torch.compile each decoder block, its shapes dynamic from the start: packed rows change
    length every batch, and padded ones their width, which would otherwise cost a recompile
    (automatic dynamic shapes) and, past dynamo's limit, a silent fall back to eager. The packed
    modes' attention is traced as a custom op (engine.attention), so a block is one graph."""
    for block in _blocks(model):
        block.compile(dynamic=True)


def reset_compile_stats() -> None:
    """Start `compile_stats`' totals afresh (and drop compiled code), e.g. between bench modes."""
    from torch._dynamo import utils

    torch._dynamo.reset()
    utils.counters.clear()
    utils.clear_compilation_metrics()
    utils.cumulative_time_spent_ns.clear()


def compile_stats() -> dict[str, float | int]:
    """This process's torch.compile totals so far, from dynamo's counters: `compile_s` (seconds
    compiling frames and backward graphs), `graphs` (graphs compiled), `graph_breaks` (breaks met
    while tracing) and `recompiles` (compilations of a frame already compiled, over dynamo's
    record of the last compilations)."""
    from torch._dynamo.utils import calculate_time_spent, counters, get_compilation_metrics

    return {
        "compile_s": calculate_time_spent()["total_wall_time"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompiles": sum(1 for m in get_compilation_metrics() if getattr(m, "recompile_reason", None)),
    }


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> FSDPModule:
    """Shard `model` in place over `mesh`; FSDP moves each rank's shards to `device`."""
    if cfg.activation_checkpointing != "none":
        apply_activation_checkpointing(
            model, cfg.activation_checkpointing, cfg.activation_checkpointing_every
        )
    apply_fsdp(model, cfg, mesh, device)
    if cfg.compile:
        check_compiler(cfg, device.type)
        apply_compile(model)
    return model  # type: ignore[return-value]


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this rank (its local shards)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(
        local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None
    )
    optim = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                optim += local(value).numel() * local(value).element_size()
    return {"params": params, "grads": grads, "optimizer": optim}
