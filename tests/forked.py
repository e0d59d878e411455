"""Ranks forked from a warm process: torchrun's environment without its start-up cost.

A torchrun launch spends ~2 CPU-s in the launcher and ~5 CPU-s per rank importing torch,
transformers and the engine before its first step; the multi-process tier pays that for every
launch. Here one forkserver per pytest worker imports them once, and every rank is a fresh fork
of it: a real process with its own gloo process group, given what torchrun gives a worker (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the way torch's own
MultiProcessTestCase forks its ranks. As torchrun does, a rank that fails ends the others
(SIGTERM, SIGKILL after a grace period) and the launch exits 1; the ranks' stdout and stderr
interleave into one stream each, as torchrun's pass-through does.

Tests of the launcher itself (signals, restarts, two nodes, per-process memory, the demo
command) keep launching torchrun (conftest.run_training).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# imported once by the forkserver: what every rank would otherwise import itself
PRELOAD = [
    "torch",
    "transformers",
    "engine.trainer",
    "engine.export",
    "engine.bench.cli",
    "tests.scripts.sweep",
    "torchrun_train",
]
TERMINATE_GRACE_S = 30  # torchrun's: SIGTERM, then SIGKILL after this long

_context: multiprocessing.context.BaseContext | None = None


def forkserver() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose children are forks of the warm process."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank(entry: str, args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """One rank in a forked child: torchrun's environment, output appended to the launch's."""
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), fd)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    if entry == "sweep":
        from tests.scripts.sweep import main

        main(args[0], args[1], args[2], args[3:])  # leaves through exit_process
    if entry == "bench":
        from engine.bench.cli import entry as bench

        sys.argv = ["engine.bench", *args]
        bench()  # leaves through exit_process
    import torchrun_train
    from engine.distributed import exit_process

    sys.argv = [torchrun_train.__file__, *args]
    torchrun_train.LAUNCHER_PID = os.getppid()  # the forkserver's import read its own parent's
    exit_process(torchrun_train.main(args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_launch(
    entry: str, args: Sequence[str], nproc: int, env: dict[str, str], timeout: float, cwd: Path
) -> subprocess.CompletedProcess:
    """Run `entry` ("sweep": tests/scripts/sweep.py, "train": torchrun_train.py, "bench":
    `python -m engine.bench`) with `args` on
    `nproc` ranks forked in `cwd`: exit code 0 when every rank exits 0, else 1 (torchrun's), and what they
    printed. Raises subprocess.TimeoutExpired (after ending the ranks) past `timeout` seconds."""
    context = forkserver()
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="fsdpo-fork-") as tmp:
        stdout, stderr = Path(tmp, "stdout"), Path(tmp, "stderr")
        ranks = []
        for rank in range(nproc):
            rank_env = {
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
            process = context.Process(
                target=_rank, args=(entry, list(args), rank_env, str(cwd), str(stdout), str(stderr))
            )
            process.start()
            ranks.append(process)
        code = _wait(ranks, time.monotonic() + timeout)
        out, err = (
            stdout.read_text() if stdout.exists() else "",
            stderr.read_text() if stderr.exists() else "",
        )
    if code is None:
        raise subprocess.TimeoutExpired([entry, *args], timeout, out, err)
    return subprocess.CompletedProcess([entry, *args], code, out, err)


def _wait(ranks: list, deadline: float) -> int | None:
    """Wait for every rank; end the rest as soon as one fails. The launch's exit code, or None
    past the deadline."""
    running = list(ranks)
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            _end(running)
            return None
        for sentinel in multiprocessing.connection.wait([p.sentinel for p in running], timeout=left):
            process = next(p for p in running if p.sentinel == sentinel)
            process.join()
            running.remove(process)
            if process.exitcode != 0:
                _end(running)
                return 1
    return 0


def _end(running: list) -> None:
    for process in running:
        process.terminate()
    stop = time.monotonic() + TERMINATE_GRACE_S
    for process in running:
        process.join(max(0.0, stop - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join()
