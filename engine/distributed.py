"""Process-group set-up from torchrun's environment, stopping on signals, and rank-aware logging.

Run under `torchrun`, the usual RANK/WORLD_SIZE/LOCAL_RANK variables are set; run as a plain
`python` process, a one-rank group is created on an in-process store so the rest of the engine
never special-cases "not distributed". The backend follows the device: nccl on CUDA, gloo on CPU.

Stopping: SIGINT and SIGTERM request a stop. In the training loop the request waits for the end
of the step (every rank learns of it in the step's one all-reduce, so all stop after the same
step); anywhere else the handler raises `Interrupted` where the process is. A second signal
exits at once. Under a launcher the process also gets SIGTERM when the launcher dies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ranks_per_node: int  # ranks on this node (`ranks_per_node`): the device mesh's shard groups

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> World:
    """Initialise the default process group (the device mesh is `engine.parallel.build_mesh`'s);
    collectives wait at most `timeout_s` for a peer (`parallel.collective_timeout_s`)."""
    single = not launched()  # plain `python torchrun_train.py`: a world of one
    local_rank = 0 if single else int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if single:  # an in-process store: no port to find or to collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(
                backend,
                store=_launcher_store(timeout),
                timeout=timeout,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
            )
    world_size = dist.get_world_size()
    return World(dist.get_rank(), world_size, local_rank, device, ranks_per_node(world_size))


def ranks_per_node(world_size: int) -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE, or every rank on one node without it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of a local rank: LOCAL_RANK modulo the GPUs this process sees, so schedulers that
    give each process one GPU (CUDA_VISIBLE_DEVICES per task) work as well as one process per GPU
    of a node."""
    return local_rank % device_count


def launched() -> bool:
    """Whether a launcher started this process (torchrun, or any that sets RANK and MASTER_ADDR)."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _launcher_store(timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store of torchrun (or any launcher setting MASTER_ADDR/PORT), with keys
    prefixed by the restart attempt: after `--max-restarts` brings a job back, a fresh process
    must never read a peer address a dead process left behind (gloo then hangs connecting)."""
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent_hosts_it and os.environ["RANK"] == "0",
        timeout=timeout,
        multi_tenant=True,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fsdpo/attempt-{attempt}", store)


def exit_process(code: int) -> NoReturn:
    """Leave with `code` once the process group is destroyed: atexit handlers run (wandb's
    among them), interpreter finalization does not.

    gloo drops a finished collective on its own worker thread, which takes the GIL to release
    the Python tensors it held, and the process group's threads outlive `destroy_process_group`.
    If that happens during finalization the thread cannot take the GIL and the process aborts
    ("terminate called without an active exception", exit -6, after all the work is done): 3 of
    10 two-rank bench runs that ended on an all_reduce, 1 of 15 with a barrier before exiting,
    and now and then a training run ending on its final evaluation; 0 of 25 leaving this way.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- stopping ------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """A stop requested by SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt is, so that
    no `except Exception` on its way up takes it for an error (`finally` clean-ups still run)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 2.0  # outside the training loop: how long a stop may wait for the main thread


@dataclass
class _StopState:
    signum: int = 0  # the first stop signal the handler took up; 0: none
    where: str = "during start-up"  # what the process is doing, for the one line
    deferred: bool = False  # in the training loop: the step finishes first
    pid: int = 0  # the process that installed the handlers (forked helpers inherit them)
    report: Callable[[int], int] | None = None  # prints the one line, returns the exit code


_STOP = _StopState()
_EXITING = threading.RLock()  # the handler and the watcher may both end the process


@contextlib.contextmanager
def stop_handlers(report: Callable[[int], int]) -> Iterator[None]:
    """SIGINT and SIGTERM request a stop while inside. A stop that must end the process at once
    (a second signal, or one the main thread cannot take up: see `_watch`) calls
    `report(signum)`, which prints the one line, and exits with the code it returns. The
    previous handlers come back on leaving (`torchrun_train.main` also runs in test processes)."""
    global _STOP
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    _STOP = _StopState(pid=os.getpid(), report=report)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd, _STOP), name="fsdpo-stop-watch", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads the end and leaves
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _STOP = _StopState()


def _on_stop_signal(signum: int, frame: object) -> None:
    if os.getpid() != _STOP.pid:  # a forked helper (a tokenising worker): its parent reports
        os._exit(128 + signum)
    if _STOP.signum:  # the second signal
        _exit_now(_STOP, signum)
    _STOP.signum = signum
    if not _STOP.deferred:
        raise Interrupted(signum)


def _watch(read_fd: int, state: _StopState) -> None:
    """End the process on a stop signal that the main thread cannot take up.

    Python runs signal handlers on the main thread, between bytecodes: blocked in C (a
    collective, or a store wait, whose peer has left) it would not notice for minutes, until
    torchrun's SIGKILL. Every signal also writes its number to the wakeup pipe read here: a
    second stop signal ends the process at once, and so does a first one that the handler has
    not taken up within STOP_GRACE_S outside the training loop (where no step end is awaited).
    """
    seen, signum, deadline = 0, 0, None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if select.select([read_fd], [], [], timeout)[0]:
            chunk = os.read(read_fd, 64)
            if not chunk:  # the handlers were removed
                break
            stops = [number for number in chunk if number in STOP_SIGNALS]
            if stops:
                seen, signum = seen + len(stops), signum or stops[0]
                if seen >= 2:
                    _exit_now(state, signum)
                deadline = time.monotonic() + STOP_GRACE_S
        else:
            deadline = None
            if not state.signum and not state.deferred:
                _exit_now(state, signum)
    os.close(read_fd)


def _exit_now(state: _StopState, signum: int) -> NoReturn:
    """Leave at once, named after the first stop signal (torchrun turns a second Ctrl-C into
    SIGTERM: it is still an interruption by SIGINT)."""
    signum = state.signum or signum
    with _EXITING:
        code = state.report(signum) if state.report else 128 + signum
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        os._exit(code)


def _forked_child() -> None:
    """A forked helper must not write its signals into its parent's wakeup pipe."""
    if _STOP.pid:
        with contextlib.suppress(ValueError):  # forked from another thread than the main one
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forked_child)


def stop_signal() -> int:
    """The stop signal this process received (SIGINT or SIGTERM), 0 if none."""
    return _STOP.signum


def stop_where() -> str:
    return _STOP.where


def stopping_at(where: str, deferred: bool = False) -> None:
    """Name what the process is doing, for the one line ("at step 12", "during export").

    `deferred` (the training loop only): a stop signal is only recorded, for the step's
    all-reduce to act on. Leaving a deferred section with a request pending raises it.
    """
    pending = _STOP.deferred and not deferred and _STOP.signum
    _STOP.where, _STOP.deferred = where, deferred
    if pending:
        raise Interrupted(_STOP.signum)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher(launcher_pid: int) -> None:
    """Under a launcher on Linux, have the kernel send SIGTERM (a stop, as above) when the
    launcher dies, so that a SIGKILLed torchrun leaves no worker writing to the output folder.

    `launcher_pid` is the parent pid read first thing at start-up: if the parent is another
    process now, the launcher died before the request took effect, and the stop starts here.
    """
    if not launched() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not available (a sandbox): the launcher's own killpg still reaches us
    if os.getppid() != launcher_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def from_main(value: Any, group: dist.ProcessGroup | None = None) -> Any:
    """Collective: rank 0's `value` on every rank (pickled; `value` itself without a process
    group). How a rank-0-only step (a file written, a hash read) tells the others its outcome,
    an exception included, so that every rank stops alike rather than one waiting forever."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def log(message: str) -> None:
    """Print on rank 0 only, flushed, so logs read like a single process (and above any
    progress bar on a terminal)."""
    if _rank() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def log_error(message: str) -> None:
    """Print an error on stderr from any rank, tagged with the rank."""
    print(f"[rank {_rank()}] {message}", file=sys.stderr, flush=True)
