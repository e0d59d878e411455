"""Sequence parallelism (`parallel.sequence_parallel = N`): one packed row split over N ranks.

Ranks r*N .. r*N+N-1 form a sequence group (`SequenceGroup`): they read the same micro-batches
(the sampler's data-parallel rank is rank // N, of world // N) and each holds positions
[k*T/N, (k+1)*T/N) of every packed row, padded to a multiple of N (`engine.forward.shard_row`).
The padded modes' rows (concatenated, separate) are first laid end to end as one row of the
same positions, padding included, each row's tokens one sequence (`engine.forward.as_one_row`),
so every forward mode splits the same way and pays its own padding.
Parameters stay FSDP-sharded over all ranks: every rank's backward yields the gradient of its
own positions, and FSDP's sum over all ranks is then exactly the full gradient.

The attention exchange is Ulysses' (DeepSpeed-Ulysses, Jacobs et al. 2023): before attention an
all-to-all turns [positions / N, all heads] into [all positions, heads / N] (`to_heads`), after
it a second one turns the output back (`to_positions`). Each rank then sees the whole row for
H/N query heads and KV/N KV heads, so the segment attention of engine/attention.py (packed
sequences, prefix sharing, sliding windows, every kernel of `KERNELS`) runs unchanged, and the
numbers are those of the unsplit row. Why not PyTorch's context parallelism
(`torch.distributed.tensor.experimental.context_parallel`, ring attention): it rotates key and
value shards around the ring and patches `scaled_dot_product_attention` for plain causal
attention, so it cannot serve a packed row's per-sequence blocks, prefix sharing's
"rejected sees the prompt, not chosen" keys or the varlen kernels (flex_attention support is
experimental), and its load balancing reorders positions, which the chunked scoring would have to
undo. Ulysses needs only all_to_all_single (NCCL and gloo, with autograd through
torch's functional collectives, `all_to_all_single_autograd`), sends 4 x activations / N per attention layer per rank (q, k,
v and the output, independent of N's ring steps), and its limit is that N must divide the
attention heads and KV heads (`check_heads`): 8 KV heads allow N up to 8.

Scoring: each rank scores its own positions through the chunked LM head; per-sequence sums are
partial (a sequence may span ranks) and `group_sum` adds them across the group: an all-reduce
forward and the identity backward, so each rank's part gets dL/dsum once (an autograd
all-reduce would sum the N identical gradients, scaling them by N). Token counts are the whole
row's, known on the host. Pair metrics and reference sums count once per group (`counts`).

Traffic (`SequenceGroup.sent`, read by the bench): the bytes this rank sends in the group's
collectives, counted on the host from the tensors' shapes (no device sync), as bandwidth-optimal
algorithms move them ("bus bytes"): an all-to-all of B bytes sends B (N-1)/N, an all-reduce
2 B (N-1)/N. Every call of `to_heads` / `to_positions` counts (so an activation-checkpoint
recompute of a block counts again) and so does each one's backward all-to-all, when its gradient
arrives (a tensor hook; a no-grad forward has none); `sum`'s backward is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

from engine.errors import UserError

KEY = "parallel.sequence_parallel"
TRAFFIC = ("all_to_all", "all_reduce")  # the keys of `SequenceGroup.sent`


def data_parallel(rank: int, world_size: int, sequence_parallel: int) -> tuple[int, int]:
    """(This rank's data-parallel rank, the data-parallel degree) under sequence groups of
    `sequence_parallel` consecutive ranks; a UserError unless it divides `world_size`."""
    if world_size % sequence_parallel:
        raise UserError(f"{KEY}={sequence_parallel} must divide the {world_size} ranks")
    return rank // sequence_parallel, world_size // sequence_parallel


def tokens_per_rank(row_tokens: int, sequence_parallel: int) -> int:
    """Positions one rank of a sequence group holds of a `row_tokens`-token row (the row is padded
    to a multiple of `sequence_parallel`)."""
    return -(-row_tokens // sequence_parallel)


def check_heads(config: object, size: int) -> None:
    """A UserError unless the model's attention heads and KV heads split `size` ways."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or heads % size or kv_heads % size:
        raise UserError(
            f"{KEY}={size}: the model's {heads} attention heads and {kv_heads} KV heads must each "
            f"split {size} ways (the all-to-all gives each rank 1/{size} of them); choose a divisor of both"
        )


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence group: `size` ranks, this one the `rank`-th, splitting each row."""

    group: dist.ProcessGroup
    size: int
    rank: int
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRAFFIC, 0), compare=False)
    """Bytes this rank sent in the group's collectives, by `TRAFFIC` kind (see the module docstring)."""

    @property
    def counts(self) -> bool:
        """Whether this rank's copy of the group's per-pair results is counted (the first rank's)."""
        return self.rank == 0

    def to_heads(self, x: Tensor) -> Tensor:
        """[1, heads, T/N, D] of this rank's positions -> [1, heads/N, T, D] of the whole row."""
        _, heads, length, dim = x.shape
        out = self._all_to_all(x.reshape(self.size, heads // self.size, length, dim).contiguous())
        return out.transpose(0, 1).reshape(1, heads // self.size, self.size * length, dim)

    def to_positions(self, x: Tensor) -> Tensor:
        """[1, T, heads/N, D] (attention's output) -> [1, T/N, heads, D] of this rank's positions."""
        _, length, heads, dim = x.shape
        out = self._all_to_all(x.reshape(self.size, length // self.size, heads, dim).contiguous())
        return out.transpose(0, 1).reshape(1, length // self.size, self.size * heads, dim)

    def sum(self, x: Tensor) -> Tensor:
        """`x` summed over the group, with the identity as its backward (see the module docstring)."""
        self._count("all_reduce", 2 * x.numel() * x.element_size())
        return _GroupSum.apply(x, self.group)

    def _all_to_all(self, parts: Tensor) -> Tensor:
        """all_to_all_single of `parts` [N, ...] (part k to the k-th rank), with autograd; its
        bytes counted now and its backward's when the gradient arrives."""
        nbytes = parts.numel() * parts.element_size()
        self._count("all_to_all", nbytes)
        out = funcol.all_to_all_single_autograd(parts, None, None, self.group)
        if out.requires_grad:
            out.register_hook(lambda grad: self._count("all_to_all", nbytes))
        return out

    def _count(self, kind: str, nbytes: int) -> None:
        """Add a collective over `nbytes` (all-reduce: twice the tensor's) as the bytes this rank
        sends: (N-1)/N of them (the part it keeps stays)."""
        self.sent[kind] += nbytes * (self.size - 1) // self.size

    def take_sent(self) -> dict[str, int]:
        """`sent` so far, starting it afresh."""
        taken = dict(self.sent)
        self.sent.update(dict.fromkeys(TRAFFIC, 0))
        return taken


class _GroupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def build_sequence_group(size: int, world_size: int) -> SequenceGroup | None:
    """Collective (every rank makes every group): this rank's `SequenceGroup` of `size`
    consecutive ranks, or None for `size` 1."""
    data_parallel(0, world_size, size)
    if size == 1:
        return None
    group, _ = dist.new_subgroups(group_size=size)
    return SequenceGroup(group, size, dist.get_rank(group))
