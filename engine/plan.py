"""Dry-run planning: what a recipe will do on N ranks, without loading weights or starting
torch.distributed.

`python torchrun_train.py RECIPE --dry-run [--world-size N] [--ranks-per-node M]` makes the real
run's input checks with the real run's functions, and stops on the first problem with the line
the real run would print (`check_inputs`): the output folder, the model folder and its
tokenizer, the chat template, and the first `SAMPLE_ROWS` rows of each local data source read,
tokenised and filtered (its format, columns, bad rows, template problems; hub data sets are not
read). Then it prints:
- the resolved recipe, and one line per input (with the sample's filter counts);
- the world-size arithmetic: ranks x micro-batch x accumulation steps = global batch (an error
  when it does not divide, as the real run would raise);
- the device mesh of `parallel.sharding` (the same shapes parallel.build_mesh makes);
- an estimate of the memory per rank, from the model built on the meta device;
- the model FLOPs of one optimizer step (`engine.metrics.model_flops`, the trainer's MFU
  numerator), for pairs of the sampled training rows' lengths (else every sequence
  `data.max_length` tokens: an upper bound).

The arithmetic and the estimate are pure functions of the `Config` and the Hugging Face model
config (`plan_run`), so tests check them against hand-computed numbers. `check_inputs` is the
part that looks at the file system. What needs every row or the weights (a global batch larger
than the data after filtering, a token budget below the longest pair, unreadable weights) is
found by the real run only.

How the memory estimate counts, per rank (P = parameters, T = trained parameters, S = the shard
size: ranks for `full`/`grad_op`, ranks per shard group for `hybrid`, 1 for `none`):
- master parameters: 4 P / S bytes (fp32, sharded; frozen LoRA base weights included);
- gradients: 4 T / S (fp32 after the reduce-scatter), or 4 T unsharded when gradients are
  accumulated unsynchronised between micro-batches (`gradient_sync` = last_micro_batch);
- AdamW state: 8 T / S (exp_avg and exp_avg_sq in fp32);
- gathered parameters, transient, in the compute dtype: for `full`/`hybrid` the larger of the two
  edge units (input embedding; final norm + LM head, kept gathered from forward to backward; with
  tied embeddings the root holds both and stays gathered) + two decoder blocks (the one computing
  and the one prefetched) + the unsharded gradients of the largest unit in backward (compute
  dtype, plus an fp32 copy for an fp32 reduce-scatter); for `grad_op` and `none` every parameter
  stays gathered;
- activations, rough: tokens per micro-batch (2 x micro x max_length: chosen and rejected rows
  at full length, an upper bound) x bytes of the compute dtype x values kept per token. A Llama
  -style block keeps about 8 h + 4 i values per token (h = hidden size, i = MLP intermediate
  size): the inputs of its two norms and their outputs feeding q/k/v and the MLP, q and k after
  rotary embedding, v, the attention output and o_proj input (about 8 h with grouped-query
  attention and a fused attention kernel that stores no T x T scores), and gate, up, silu(gate)
  and their product (4 i). This is Korthikanti et al. 2022's 34 s b h bytes per layer, redone
  for a SwiGLU MLP without dropout. With activation checkpointing a checkpointed block keeps
  only its input (h values per token) and one block's full set is recomputed at a time.
  Under `parallel.sequence_parallel` = N a rank holds 1/N of each packed row's positions
  (rounded up: rows are padded to a multiple of N), so every count above is per 1/N of the row,
  except attention's: after the all-to-all it keeps q, k, v and its output for the whole row but
  1/N of the heads, T x (values per token) / N as well. The all-to-all's send and receive buffers
  are transient (not counted); the row length is the sequence group's, tokens per micro-batch as
  above (a token budget bounds the whole row);
- LM-head chunk: the forward scores completion tokens (a rank's own positions under sequence
  parallelism) through the head in chunks of
  `training.logprob_chunk_tokens` (0 = all at once), recomputed in backward: logits in the
  compute dtype, their fp32 copy and its gradient (vocab x (bytes + 8) per token of one chunk);
- a live reference (`reference.mode = "live"`): its parameters, 4 P / S (an fp32 copy sharded as
  the policy; none with LoRA: the reference is the base model), gathered one unit at a time
  while the policy's are not; with a token-level KL loss (tdpo) its LM-head unit (or tied root)
  stays gathered and each head chunk computes its logits too (vocab x (bytes + 8) per token).
Not counted: the CUDA context and allocator fragmentation (budget a few GiB), communication
buffers, the reference log-probs (a few bytes per pair).

The longest row that fits (`tokens_that_fit`): the most tokens per rank per forward whose
estimate stays within each of `GPU_GIB` less `RESERVE_GIB` for what is not counted.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from engine import losses
from engine.config import Config, LoraConfig
from engine.data.sampler import BatchPlan, plan_batches
from engine.distributed import ranks_per_node as node_ranks
from engine.errors import UserError, first_line
from engine.forward import forward_work
from engine.metrics import ModelShape, model_flops, model_shape
from engine.parallel import compute_dtype, defers_gradient_sync, edge_units, mesh_shape, shard_size
from engine.recipe import to_toml
from engine.sequence_parallel import check_heads, data_parallel, tokens_per_rank

GIB = 2**30
GPU_GIB = (40, 80, 140)
"""GPU memory the dry run sizes the longest row for (A100-40GB; A100 / H100 80GB; H200)."""
RESERVE_GIB = 4
"""Of each GPU's memory, left to the CUDA context and allocator fragmentation (not estimated)."""


# ----------------------------------------------------------------------------------------------
# World-size arithmetic and the mesh


# ----------------------------------------------------------------------------------------------
# The model, measured on the meta device


@dataclass(frozen=True)
class ModelSize:
    architecture: str
    parameters: int
    trainable: int
    blocks: int
    largest_block: int
    largest_block_trainable: int
    root: int  # parameters outside the decoder blocks (embeddings, final norm, LM head)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    input_unit: int = 0  # parameters of the input-side FSDP unit (embeddings); 0 when tied
    output_unit: int = 0  # of the output-side unit (final norm + LM head); 0 when tied
    output_unit_trainable: int = 0
    flops: ModelShape | None = None  # what model FLOPs are counted from


def measure_model(hf_config: Any, lora: LoraConfig, trust_remote_code: bool = False) -> ModelSize:
    """Count parameters of the model `hf_config` describes (with LoRA adapters when enabled),
    built on the meta device: no memory is allocated and no weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.model import apply_lora, decoder_blocks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
            except (ValueError, ImportError, KeyError) as e:
                raise UserError(f"model.path: cannot build the model from its config ({e})") from None
            if lora.enabled:
                model = apply_lora(model, lora, seed=0)
    params = list(model.parameters())  # shared (tied) parameters are listed once
    blocks = decoder_blocks(model)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    block_trainable = [sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks]
    total = sum(p.numel() for p in params)
    input_side, output_side = edge_units(model)
    output_params = [p for m in output_side for p in m.parameters()]
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = int(text.hidden_size)
    return ModelSize(
        architecture=type(model.get_base_model() if lora.enabled else model).__name__,
        parameters=total,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        blocks=len(blocks),
        largest_block=max(block_sizes),
        largest_block_trainable=max(block_trainable),
        root=total - sum(block_sizes),
        input_unit=sum(p.numel() for m in input_side for p in m.parameters()),
        output_unit=sum(p.numel() for p in output_params),
        output_unit_trainable=sum(p.numel() for p in output_params if p.requires_grad),
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        num_layers=int(getattr(text, "num_hidden_layers", len(blocks))),
        vocab_size=int(text.vocab_size),
        flops=model_shape(model),
    )


# ----------------------------------------------------------------------------------------------
# Memory per rank


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    how: str
    on_host: bool = False


@dataclass
class MemoryEstimate:
    compute_dtype: str
    shard_size: int
    items: list[MemoryItem] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return sum(i.bytes for i in self.items if not i.on_host)

    @property
    def host_total(self) -> int:
        return sum(i.bytes for i in self.items if i.on_host)

    def get(self, name: str) -> int:
        return next(i.bytes for i in self.items if i.name == name)


def activation_values_per_token(size: ModelSize) -> int:
    """Values one un-checkpointed decoder block keeps per token for backward (8 h + 4 i)."""
    return 8 * size.hidden_size + 4 * size.intermediate_size


def estimate_memory(
    cfg: Config,
    size: ModelSize,
    world_size: int,
    ranks_per_node: int,
    device_type: str = "cuda",
    rank_tokens: int | None = None,
) -> MemoryEstimate:
    """Bytes per rank of each kind of memory a training step needs (see the module docstring),
    for `rank_tokens` tokens per rank per forward (default: the recipe's micro-batch, 1/N of it
    under sequence parallelism)."""

    p, t = cfg.parallel, cfg.training
    bf16 = compute_dtype(p, torch.device(device_type)) == torch.bfloat16
    dtype_bytes = 2 if bf16 else 4
    dtype = "bf16" if bf16 else "fp32"
    shard = shard_size(p, world_size, ranks_per_node)
    batches = data_batches(cfg, world_size)
    host = p.cpu_offload and device_type == "cuda"
    est = MemoryEstimate(dtype, shard)
    add = est.items.append

    def state(name: str, count: int, how: str) -> None:
        add(MemoryItem(name, count, how + (" on the host (cpu_offload)" if host else ""), host))

    params, trained = size.parameters, size.trainable
    state("parameters", 4 * params // shard, f"fp32 master, {_n(params)} / {shard}")
    accumulates = batches.accumulation_steps != 1  # 0: a token budget, usually several
    if defers_gradient_sync(p) and accumulates and shard > 1:
        state("gradients", 4 * trained, f"fp32, {_n(trained)} unsharded while accumulating (gradient_sync)")
    else:
        state("gradients", 4 * trained // shard, f"fp32, {_n(trained)} trained / {shard}")
    state("optimizer", 8 * trained // shard, f"AdamW 2 x fp32, {_n(trained)} / {shard}")

    # unsharded gradients of the unit in backward, in the compute dtype, plus their copy in the
    # reduce dtype when it differs (the reduce-scatter input)
    reduce_bytes = 4 if p.reduce_dtype == "fp32" else 2
    grad_bytes = dtype_bytes + (reduce_bytes if reduce_bytes != dtype_bytes else 0)
    block_grads = size.largest_block_trainable
    if p.sharding in ("full", "hybrid"):
        # the root's own parameters stay gathered; of the edge units the larger is gathered at a
        # time (output at the start of backward with its gradients, input at its end), with the
        # block computing and the one prefetched
        own = size.root - size.input_unit - size.output_unit
        edge = max(size.input_unit, size.output_unit)
        grads = max(block_grads, size.output_unit_trainable)
        gathered_bytes = (own + edge + 2 * size.largest_block) * dtype_bytes + grads * grad_bytes
        units = (
            f"root {_n(own)}"
            if own
            else f"{'output' if size.output_unit >= size.input_unit else 'input'} unit {_n(edge)}"
        )
        how = (
            f"{dtype}: {units} + 2 blocks of {_n(size.largest_block)} "
            f"+ gradients of the largest unit ({_n(grads)}, {grad_bytes} B each)"
        )
    else:
        gathered_bytes = params * dtype_bytes + block_grads * grad_bytes
        how = f"{dtype}: all {_n(params)} stay gathered ({p.sharding}) + 1 block's gradients ({_n(block_grads)})"
    add(MemoryItem("gathered", gathered_bytes, how))

    n = p.sequence_parallel
    tokens = rank_tokens
    if tokens is None:
        tokens = tokens_per_rank(t.micro_batch_tokens or 2 * t.micro_batch_size * cfg.data.max_length, n)
    what = f"{tokens} tokens" + (f" per rank (1/{n} of a {n * tokens}-token row)" if n > 1 else "")
    per_block = activation_values_per_token(size)
    layers = size.num_layers
    if p.activation_checkpointing == "full":
        checkpointed = math.ceil(layers / p.activation_checkpointing_every)
        kept = checkpointed * size.hidden_size + (layers - checkpointed) * per_block + per_block
        how = (
            f"rough: {what} x {dtype_bytes} B x ({checkpointed} checkpointed blocks x h={size.hidden_size}"
            + (f" + {layers - checkpointed} blocks" if layers > checkpointed else "")
            + f" + 1 recomputed x {per_block})"
        )
    else:
        kept = layers * per_block
        how = f"rough: {what} x {dtype_bytes} B x {layers} blocks x {per_block} (8h+4i), no checkpointing"
    add(MemoryItem("activations", tokens * dtype_bytes * kept, how))

    chunk = min(t.logprob_chunk_tokens or tokens, tokens)
    how = f"{chunk} tokens x vocab {size.vocab_size} x ({dtype_bytes} + 8) B"
    add(MemoryItem("head_chunk", chunk * size.vocab_size * (dtype_bytes + 8), how))
    if cfg.reference.mode == "live":
        add(_live_reference(cfg, size, shard, dtype_bytes, chunk))
    return est


def tokens_that_fit(
    cfg: Config, size: ModelSize, world_size: int, ranks_per_node: int, gpu_bytes: int
) -> int:
    """The most tokens per rank per forward whose `estimate_memory` stays within `gpu_bytes`
    (0: not even one token; the estimate grows with the tokens, so a bisection finds it)."""

    def fits(tokens: int) -> bool:
        est = estimate_memory(cfg, size, world_size, ranks_per_node, rank_tokens=tokens)
        return est.device_total <= gpu_bytes

    low, high = 0, 1  # fits(low); find a high that does not
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _live_reference(cfg: Config, size: ModelSize, shard: int, dtype_bytes: int, chunk: int) -> MemoryItem:
    """The live reference's memory (see the module docstring)."""
    if cfg.lora.enabled:
        return MemoryItem("reference", 0, "live: the base model with adapters off, no copy")
    count, how = 4 * size.parameters // shard, f"live: fp32 copy, {_n(size.parameters)} / {shard}"
    if losses.needs_token_kl(cfg.loss):
        head = size.output_unit or size.root
        count += head * dtype_bytes + chunk * size.vocab_size * (dtype_bytes + 8)
        how += f" + its LM head gathered ({_n(head)}) + its head chunk ({chunk} tokens x vocab)"
    return MemoryItem("reference", count, how)


def _n(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


# ----------------------------------------------------------------------------------------------
# The plan and its report


@dataclass
class Plan:
    batches: BatchPlan
    ranks_per_node: int
    mesh: tuple[tuple[int, ...], tuple[str, ...]]
    size: ModelSize | None = None
    memory: MemoryEstimate | None = None
    flops: tuple[float, str] | None = None  # model FLOPs per optimizer step, and from what
    fits: list[int] = field(default_factory=list)  # tokens per rank that fit each of GPU_GIB
    notes: list[str] = field(default_factory=list)


def plan_run(
    cfg: Config,
    hf_config: Any | None,
    world_size: int,
    ranks_per_node: int,
    pair_lengths: np.ndarray | None = None,
) -> Plan:
    """The whole plan; without `hf_config` (a hub id offline) only the arithmetic and the mesh.
    `pair_lengths`: [N, 3] prompt, chosen and rejected tokens of sampled training pairs."""
    batches = data_batches(cfg, world_size)
    mesh = mesh_shape(cfg.parallel, world_size, ranks_per_node)
    plan = Plan(batches, ranks_per_node, mesh)
    n = cfg.parallel.sequence_parallel
    if n > 1:
        plan.notes.append(
            f"note: parallel.sequence_parallel={n}: each rank holds 1/{n} of every row; the "
            f"activations and LM-head chunk above are one rank's 1/{n}"
        )
    if hf_config is not None:
        if n > 1:
            check_heads(hf_config, n)
        plan.size = measure_model(hf_config, cfg.lora, cfg.model.trust_remote_code)
        plan.memory = estimate_memory(cfg, plan.size, world_size, ranks_per_node)
        plan.fits = [
            tokens_that_fit(cfg, plan.size, world_size, ranks_per_node, (gib - RESERVE_GIB) * GIB)
            for gib in GPU_GIB
        ]
        plan.flops = step_flops(cfg, plan.size.flops, pair_lengths)
    return plan


def step_flops(cfg: Config, shape: ModelShape, pair_lengths: np.ndarray | None) -> tuple[float, str]:
    """Model FLOPs of one optimizer step (`engine.metrics.model_flops`) and how they were
    estimated: the sampled pairs in micro-batches of `micro_batch_size` (padded modes pay their
    padding; packed work adds up per pair, so a token budget changes nothing), scaled to the
    global batch; without a sample every pair has a 1-token prompt and completions filling
    `data.max_length`, an upper bound."""
    t, mode = cfg.training, cfg.training.forward_mode
    if pair_lengths is None or not len(pair_lengths):
        n = cfg.data.max_length
        pair_lengths = np.array([[1, n - 1, n - 1]])
        how = f"at most: every sequence data.max_length={n} tokens (no training rows sampled)"
    else:
        mean = pair_lengths.mean(axis=0)
        how = (
            f"{len(pair_lengths)} sampled training pairs: prompt {mean[0]:.0f}, chosen {mean[1]:.0f}, "
            f"rejected {mean[2]:.0f} tokens on average"
        )
    size = min(t.micro_batch_size, len(pair_lengths))
    batches = [pair_lengths[i : i + size] for i in range(0, len(pair_lengths) - size + 1, size)]
    per_pair = sum(model_flops(shape, forward_work(mode, b)) for b in batches) / (len(batches) * size)
    return per_pair * t.global_batch_size, f"{mode}, {how}"


def data_batches(cfg: Config, world_size: int) -> BatchPlan:
    """`plan_batches` over the ranks that read different pairs (all of them, or one per sequence
    group: `engine.sequence_parallel.data_parallel`, whose UserError it raises)."""
    _, data_ranks = data_parallel(0, world_size, cfg.parallel.sequence_parallel)
    return plan_batches(cfg.training, data_ranks)


def format_plan(cfg: Config, plan: Plan, inputs: list[str]) -> str:
    b, n = plan.batches, cfg.parallel.sequence_parallel
    world = b.world_size * n
    nodes = math.ceil(world / max(1, plan.ranks_per_node))
    shape, names = plan.mesh
    out = ["# resolved recipe", to_toml(cfg).rstrip(), "", "# inputs", *inputs, "", "# ranks and batches"]
    groups = f", data {b.world_size} x sequence {n}" if n > 1 else ""
    rows = [
        ("ranks", f"{world} ({plan.ranks_per_node} per node, {nodes} node{'s' * (nodes > 1)}{groups})"),
        ("global batch", f"{b.global_batch_size} pairs per optimizer step"),
        *(
            [
                (
                    "micro batch",
                    f"up to {b.micro_batch_tokens} tokens per rank per forward"
                    if n == 1
                    else f"up to {b.micro_batch_tokens} tokens per sequence group's row per forward "
                    f"({tokens_per_rank(b.micro_batch_tokens, n)} per rank)",
                ),
                (
                    "accumulation steps",
                    f"per step: as many as the fullest of {b.pairs_per_rank} pairs per rank need",
                ),
            ]
            if b.micro_batch_tokens
            else [
                (
                    "micro batch",
                    f"{b.micro_batch_size} pair{'s' * (b.micro_batch_size > 1)} per rank per forward",
                ),
                (
                    "accumulation steps",
                    f"{b.accumulation_steps} = {b.global_batch_size} / ({b.micro_batch_size} x {b.world_size} "
                    f"{'data-parallel ' * (n > 1)}ranks)",
                ),
            ]
        ),
        ("sharding", f"{cfg.parallel.sharding}: mesh {shape} ({' x '.join(names)})"),
        *([("model FLOPs per step", f"{plan.flops[0]:.3g} ({plan.flops[1]})")] if plan.flops else []),
    ]
    out += [f"{k:<20} {v}" for k, v in rows]
    if plan.size is not None and plan.memory is not None:
        s, m = plan.size, plan.memory
        trained = f"{_n(s.trainable)} trained" + (" in LoRA adapters" if cfg.lora.enabled else "")
        out += [
            "",
            f"# estimated memory per rank (GPU, {m.compute_dtype} compute, state sharded over {m.shard_size})",
            f"model: {s.architecture}, {_n(s.parameters)} parameters ({trained}), "
            f"{s.blocks} blocks of {_n(s.largest_block)}, hidden {s.hidden_size}, vocab {s.vocab_size}",
        ]
        for item in m.items:
            out.append(f"{item.name:<12} {item.bytes / GIB:8.2f} GiB  {item.how}")
        out.append(f"{'total':<12} {m.device_total / GIB:8.2f} GiB  on each GPU, plus the CUDA context")
        if m.host_total:
            out.append(f"{'host':<12} {m.host_total / GIB:8.2f} GiB  per rank in CPU memory (cpu_offload)")
        n = cfg.parallel.sequence_parallel
        fits = ", ".join(f"{tokens} in {gib} GiB" for gib, tokens in zip(GPU_GIB, plan.fits, strict=True))
        rows = f"; a row over the {n} ranks of a sequence group: {n} x that" if n > 1 else ""
        out.append(
            f"{'fits':<12} tokens per rank per forward: {fits} of GPU memory, less {RESERVE_GIB} GiB "
            f"for the CUDA context and fragmentation{rows}"
        )
    out += plan.notes
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# What the dry run checks on disk


def load_model_config(cfg: Config) -> tuple[Any | None, str | None]:
    """(HF config, None), or (None, a note) when a hub id cannot be resolved here (offline).
    A local folder that is missing or holds no readable config is a UserError."""
    from transformers import AutoConfig

    from engine.config import is_local_path
    from engine.model import check_model_folder, model_folder

    path = cfg.model.path
    check_model_folder(path)
    note = (
        f"note: the memory estimate needs the model config; {path} is not in the Hugging Face "
        "cache and the hub cannot be reached from here (give model.path=<a folder with its config.json>)"
    )
    folder, _ = model_folder(path)  # the folder, or the hub id's snapshot in the local cache
    if folder is None and not _hub_reachable():
        return None, note
    try:
        return AutoConfig.from_pretrained(
            str(folder or path), trust_remote_code=cfg.model.trust_remote_code
        ), None
    except (OSError, ValueError, KeyError) as e:
        if is_local_path(path):
            raise UserError(f"model.path: cannot load a model config from {path} ({first_line(e)})") from None
        return None, note


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves (offline, the hub client would retry for ~25 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def check_inputs(cfg: Config) -> tuple[list[str], list[str], Any | None, np.ndarray]:
    """Make the real run's input checks, in its order, without loading weights or tokenising
    every row: the output folder, the model folder and its tokenizer, the chat template, and a
    sample of each local data source (`check_data`). Returns (one line per input, notes, the
    model's HF config or None: `load_model_config`, the sampled training pairs' lengths);
    raises the real run's UserError on the first problem."""
    from engine.checkpoint import resume_path
    from engine.config import is_local_path
    from engine.data.tokenize import resolve_chat_template
    from engine.model import build_tokenizer
    from engine.run_dir import check_output_dir  # the very checks a real run makes

    output_dir = Path(cfg.job.output_dir)
    resume = resume_path(cfg.checkpoint, output_dir)
    check_output_dir(output_dir, cfg.job.overwrite, resuming=resume is not None)

    hf_config, note = load_model_config(cfg)  # the model folder first, as build_tokenizer checks it
    notes = [note] if note else []
    tokenizer = None
    if hf_config is not None:  # a local folder, or a hub model in the cache or reachable
        offline = not is_local_path(cfg.model.path) and not _hub_reachable()
        tokenizer = build_tokenizer(cfg.model, local_files_only=offline)
    lines = [
        f"model.path: {cfg.model.path}"
        + (f" (tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens)" if tokenizer else "")
    ]
    template = resolve_chat_template(cfg.data.chat_template)
    data_lines, data_notes, pair_lengths = check_data(cfg, tokenizer, template)
    lines += data_lines
    notes += data_notes
    for key, value in (
        ("data.cache_dir", cfg.data.cache_dir),
        ("reference.cache_dir", cfg.reference.cache_dir),
    ):
        folder = Path(value).expanduser()
        if value and folder.exists() and not folder.is_dir():
            raise UserError(f"{key}: {value} is not a folder")
    lines.append(f"job.output_dir: {output_dir}" + (f" (resumes from {resume})" if resume else ""))
    return lines, notes, hf_config, pair_lengths


SAMPLE_ROWS = 64
"""Rows of each data source the dry run reads, tokenises and filters (the first ones)."""


def check_data(
    cfg: Config, tokenizer: Any | None, template: str | None
) -> tuple[list[str], list[str], np.ndarray]:
    """Read the first `SAMPLE_ROWS` rows of each local data source and put them through the
    real run's functions: the source's format and columns (`ResolvedSource.read_pairs`), the
    tokenisation and chat template (`tokenize_rows`), the bad-row and template checks and the
    filters (`filter_source`). Hub data sets are not read. Without a tokenizer (a hub model
    offline) only the files are checked. Returns (one line per source, notes, [N, 3] prompt,
    chosen and rejected tokens of the training pairs kept from the samples)."""
    import pyarrow as pa

    from engine.data.cache import TokenizedSource, features
    from engine.data.dataset import check_kept, filter_source
    from engine.data.sources import resolve_source
    from engine.data.tokenize import tokenize_rows

    d = cfg.data
    lines, notes, train_lengths = [], [], [np.zeros((0, 3), np.int64)]
    for key, sources in (("data.train", d.train), ("data.eval", d.eval)):
        for i, source in enumerate(sources):
            name = f"{key}[{i}] ({source.path})"  # as build_dataset names it
            resolved = resolve_source(source, name)
            head = f"{key}[{i}]: {source.path}: "
            if resolved.kind == "hub":
                lines.append(head + f"hub data set, split {source.split!r} (not read by the dry run)")
                continue
            if resolved.files:
                total = sum(f.stat().st_size for f in resolved.files)
                head += f"{len(resolved.files)} {resolved.kind} file(s), {total / 2**20:.1f} MiB"
            else:
                head += "saved data set folder"
            columns = source.columns or d.columns  # as ensure_tokenized
            rows, offsets = resolved.read_pairs(d.format, columns, SAMPLE_ROWS)
            if tokenizer is None:
                lines.append(head + " (rows not tokenised: no tokenizer offline)")
                continue
            out = tokenize_rows(
                rows.to_dict(), list(range(len(rows))),
                tokenizer=tokenizer, chat_template=template, fmt=d.format, columns=columns,
            )  # fmt: skip
            sample = TokenizedSource(
                name,
                pa.Table.from_pydict(out, schema=features().arrow_schema),
                resolved.file_names,
                offsets,
                Path(),
            )
            spans, stats = filter_source(sample, d)  # raises as the real run would on a bad row
            if key == "data.train":
                train_lengths.append(
                    np.stack([spans[k] for k in ("prompt_len", "chosen_len", "rejected_len")], 1)
                )
            complete = len(rows) < SAMPLE_ROWS  # the sample is the whole source
            if complete:
                check_kept(stats, name)
            dropped = ", ".join(f"{k} {v['dropped']}" for k, v in stats["filters"].items() if v["dropped"])
            what = "all" if complete else "first"
            lines.append(
                head + f"; {what} {len(rows)} rows: {stats['kept']} kept (dropped: {dropped or 'none'})"
            )
            if not complete and stats["kept"] == 0:
                first = (stats.get("bad_row_examples") or ["every row filtered out"])[0]
                notes.append(
                    f"note: {name}: none of the first {len(rows)} rows gives a pair ({first}); "
                    "the run stops if no row does"
                )
    return lines, notes, np.concatenate(train_lengths)


def dry_run(cfg: Config, world_size: int | None = None, ranks_per_node: int | None = None) -> str:
    """Validate `cfg` against the file system and return the printed plan (no weights loaded,
    no process group)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    ranks_per_node = ranks_per_node or node_ranks(world_size)
    if world_size % ranks_per_node and ranks_per_node < world_size:
        raise UserError(f"--ranks-per-node={ranks_per_node} must divide --world-size={world_size}")
    ranks_per_node = min(ranks_per_node, world_size)
    inputs, notes, hf_config, pair_lengths = check_inputs(cfg)
    data_batches(cfg, world_size)  # the sampler's rule, as the real run checks after the data
    # Model-specific limits on the recipe (the sliding-window attention limit) go here, calling
    # the function the real run calls, with `hf_config` (None: a hub model not reachable offline).
    plan = plan_run(cfg, hf_config, world_size, ranks_per_node, pair_lengths)
    plan.notes += notes
    return format_plan(cfg, plan, inputs)
