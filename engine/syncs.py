"""Counting the reads of tensor values into Python: on a GPU each one makes the host wait.

On the CPU nothing waits, so a training step's would-be synchronisations are counted instead:
every read of a tensor's values (`item`, `tolist`, `bool`, `int`, `float`, `index`, `cpu`,
`numpy`) and every op whose output size depends on values (`nonzero`, boolean indexing, ...),
by a torch function mode, each named by its file and function. tests/test_syncs.py pins the
step's count with it; the GPU check reports it on CPU (on CUDA it uses
`torch.cuda.set_sync_debug_mode`).
"""

from __future__ import annotations

import collections
import sys

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
SIZED_BY_VALUES = {"nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select"}


def site(filename: str, function: str) -> str:
    """`file:function`, the file relative to site-packages, the engine or the tests."""
    for root in ("site-packages/", "/engine/", "/tests/"):
        if root in filename:
            tail = filename.split(root, 1)[1]
            filename = tail if root == "site-packages/" else root.strip("/") + "/" + tail
            break
    return f"{filename}:{function}"


class ReadCounter(TorchFunctionMode):
    """Counts value reads by (kind, file:function of the caller); keeps the tensors read by
    torch.optim's `_get_value` (the optimizer's host step counters, checked by the caller)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()
        self.optimizer_steps: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                name = "boolean index"
        if name in READS or name in SIZED_BY_VALUES or name == "boolean index":
            caller = sys._getframe(1)
            where = site(caller.f_code.co_filename, caller.f_code.co_name)
            if where == "torch/optim/optimizer.py:_get_value":
                self.optimizer_steps.append(args[0])
            else:
                self.reads[(name, where)] += 1
        return func(*args, **(kwargs or {}))
