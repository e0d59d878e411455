"""fsdpo entry point.

    torchrun --nproc_per_node N torchrun_train.py RECIPE.toml [table.key=value ...]
    python torchrun_train.py RECIPE.toml [table.key=value ...]      (one process)

Flags (anywhere after the recipe):
    --build-reference-only   build the reference log-prob cache and exit
    --dry-run                validate the recipe and its inputs, print the resolved recipe, the
                             batch arithmetic, the device mesh and the estimated memory per rank;
                             loads no weights and starts no process group
    --world-size N           with --dry-run: ranks to plan for (default $WORLD_SIZE or 1)
    --ranks-per-node M       with --dry-run: ranks per node (default $LOCAL_WORLD_SIZE or N)

Exit code 0 on success; 2 on a user error (one line per problem on stderr, naming the key, file
or row; under torchrun every rank that finds it prints it, tagged with its rank); 130 / 143 when
stopped by SIGINT (Ctrl-C) / SIGTERM: the current step finishes, nothing half-written is kept,
and one line names the checkpoint a rerun resumes from. A second signal exits at once. torchrun
itself exits 1 when a worker fails (its summary shows the worker's code and line) or on a signal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import Config

LAUNCHER_PID = os.getppid()  # read first thing: the launcher that started us (die_with_launcher)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe: list[Config] = []  # once loaded: the interrupted line's resume hint reads it
    try:
        from engine import distributed  # imports torch (seconds), before the handlers are in
    except KeyboardInterrupt:
        return _interrupted(signal.SIGINT, "during start-up", None)

    reported: list[int] = []

    def interrupted(signum: int) -> int:  # once: an exit at once may come here again
        if reported:
            return reported[0]
        reported.append(128 + signum)
        return _interrupted(signum, distributed.stop_where(), recipe[0] if recipe else None)

    with distributed.stop_handlers(report=interrupted):
        from engine.errors import UserError

        try:
            distributed.die_with_launcher(LAUNCHER_PID)
            return _run(argv, recipe)
        except BaseException as e:
            # after a stop signal, whatever ends the run is its consequence (a peer that left)
            signum = e.signum if isinstance(e, distributed.Interrupted) else distributed.stop_signal()
            if signum:
                return interrupted(signum)
            if isinstance(e, UserError):
                _report(e)
                return 2
            raise


def _run(argv: list[str], recipe: list[Config]) -> int:
    from engine import distributed
    from engine.recipe import load_config

    overrides, flags = _parse_args(argv[1:])
    cfg = load_config(argv[0], overrides)
    if "--dry-run" in flags:
        from engine.plan import dry_run

        report = dry_run(cfg, flags.get("--world-size"), flags.get("--ranks-per-node"))
        if os.environ.get("RANK", "0") == "0":
            print(report, flush=True)
        return 0

    from engine.post_train import finish
    from engine.trainer import Trainer, build_reference_cache

    recipe.append(cfg)  # after the imports _resume_hint reads (a stop's line never waits on one)
    world = distributed.init_distributed(cfg.parallel.collective_timeout_s)
    trainer = None
    try:
        _fault_user_error(world.rank)
        if "--build-reference-only" in flags:
            build_reference_cache(cfg, world)
        else:
            trainer = Trainer(cfg, world)
            trainer.train()  # ends with the export of final/, a collective
    except BaseException as e:
        # a stop skips the teardown: it waits for pending collectives, and peers may have left
        if not (isinstance(e, distributed.Interrupted) or distributed.stop_signal()):
            distributed.shutdown()
        raise
    distributed.shutdown()
    if trainer is not None and world.is_main:  # no process group left for anyone to wait in
        finish(cfg.hub, cfg.post_train, trainer.run_dir)
    return 0


FLAGS = ("--build-reference-only", "--dry-run")
VALUE_FLAGS = ("--world-size", "--ranks-per-node")  # integers, only with --dry-run


def _parse_args(args: list[str]) -> tuple[list[str], dict[str, int | None]]:
    """(overrides, flags): `--flag`, `--flag N` or `--flag=N` anywhere after the recipe."""
    from engine.errors import UserError, did_you_mean

    overrides: list[str] = []
    flags: dict[str, int | None] = {}
    items = iter(args)
    for arg in items:
        if not arg.startswith("--"):
            overrides.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in VALUE_FLAGS:
            value = value if eq else next(items, "")
            try:
                flags[name] = int(value)
            except ValueError:
                raise UserError(f"{name}: expected an integer >= 1, got {value!r}") from None
            if flags[name] < 1:
                raise UserError(f"{name}: expected an integer >= 1, got {value!r}")
        elif name in FLAGS and not eq:
            flags[name] = None
        else:
            hint = did_you_mean(name, [*FLAGS, *VALUE_FLAGS])
            raise UserError(f"{arg}: unknown flag{hint} (known: {', '.join([*FLAGS, *VALUE_FLAGS])})")
    if "--dry-run" not in flags and any(name in flags for name in VALUE_FLAGS):
        name = next(name for name in VALUE_FLAGS if name in flags)
        raise UserError(f"{name}: only with --dry-run (a real run takes its ranks from torchrun)")
    return overrides, flags


def _report(error: Exception) -> None:
    """Each line of `error` on stderr, from every rank (tagged with it under a launcher): the
    rank that finds an error first may be the only one to print before torchrun stops the
    others. Also torchrun's error file, so that its failure summary shows the lines too."""
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    lines = [f"fsdpo: error: {prefix}{line}" for line in str(error).splitlines() or [""]]
    print("\n".join(lines), file=sys.stderr, flush=True)
    _write_error_file(type(error).__name__, "\n".join(lines))


def _write_error_file(kind: str, text: str) -> None:
    """The file torchrun's agent reads when a worker fails (TORCHELASTIC_ERROR_FILE, in the
    format of torch.distributed.elastic's ErrorHandler): its summary then shows `text` where it
    would say "To enable traceback see ...", and the peers learn that this rank failed."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        extra = {"py_callstack": text, "timestamp": str(int(time.time()))}
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": {"message": f"{kind}: {text}", "extraInfo": extra}}))


def _peer_failed() -> bool:
    """Whether another local rank of this launch wrote its error file: torchrun then stops this
    rank with SIGTERM, and the peer's line, not an "interrupted" one, is the cause to show."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    mine = Path(path)  # <attempt folder>/<local rank>/error.json
    return any(other != mine for other in mine.parent.parent.glob(f"*/{mine.name}"))


def _interrupted(signum: int, where: str, cfg: Config | None) -> int:
    """The exit code of a stop, and its one line on stderr: from rank 0 only (every rank stops
    after the same step, and torchrun passes a signal to all of them), and not when a peer's
    error is the cause."""
    if os.environ.get("RANK", "0") == "0" and not _peer_failed():
        line = f"fsdpo: interrupted ({signal.Signals(signum).name}) {where}; {_resume_hint(cfg)}"
        with contextlib.suppress(OSError):  # a launcher that died may have taken the pipe along
            print(line, file=sys.stderr, flush=True)
    return 128 + signum


def _resume_hint(cfg: Config | None) -> str:
    """What rerunning does: resume from the newest complete checkpoint, or start over."""
    if cfg is None:
        return "nothing was saved"
    from engine.checkpoint import complete_checkpoints
    from engine.errors import UserError
    from engine.run_dir import check_output_dir

    output_dir = Path(cfg.job.output_dir)
    found = complete_checkpoints(output_dir / "checkpoints")
    if found:
        rerun = "the same command" if cfg.checkpoint.resume == "auto" else "with checkpoint.resume=auto"
        return f"rerun {rerun} to resume from {found[-1][1].name}"
    try:
        check_output_dir(output_dir, cfg.job.overwrite, resuming=False)
    except UserError:  # this run's first files are there
        return "no checkpoint yet; rerun with job.overwrite=true to start over"
    return "nothing was saved; rerun the same command to start over"


def _fault_user_error(rank: int) -> None:
    """Testing hook: FSDPO_FAULT_USER_ERROR=R raises a UserError on rank R only, at start-up, as
    a bad input that one rank finds before the others would."""
    if os.environ.get("FSDPO_FAULT_USER_ERROR") == str(rank):
        from engine.errors import UserError

        raise UserError(f"FSDPO_FAULT_USER_ERROR: an error injected on rank {rank}")


if __name__ == "__main__":
    status = main(sys.argv[1:])
    distributed = sys.modules.get("engine.distributed")
    if distributed is not None:  # a process group may have run: leave as exit_process explains
        distributed.exit_process(status)
    sys.exit(status)
