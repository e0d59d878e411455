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

Exit code 0 on success, 2 on a user error (one line on stderr naming the key, file or row).
"""

from __future__ import annotations

import difflib
import os
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.errors import UserError

    try:
        from engine.config import load_config

        overrides, flags = _parse_args(argv[1:])
        cfg = load_config(argv[0], overrides)
        if "--dry-run" in flags:
            from engine.plan import dry_run

            report = dry_run(cfg, flags.get("--world-size"), flags.get("--ranks-per-node"))
            if os.environ.get("RANK", "0") == "0":
                print(report, flush=True)
            return 0
    except UserError as e:
        _report(e)
        return 2

    from engine.distributed import init_distributed, shutdown
    from engine.trainer import Trainer

    world = init_distributed()
    try:
        if "--build-reference-only" in flags:
            Trainer(cfg, world, reference_only=True)
        else:
            Trainer(cfg, world).train()
    except UserError as e:
        _report(e)
        return 2
    finally:
        shutdown()
    return 0


FLAGS = ("--build-reference-only", "--dry-run")
VALUE_FLAGS = ("--world-size", "--ranks-per-node")  # integers, only with --dry-run


def _parse_args(args: list[str]) -> tuple[list[str], dict[str, int | None]]:
    """(overrides, flags): `--flag`, `--flag N` or `--flag=N` anywhere after the recipe."""
    from engine.errors import UserError

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
            hint = difflib.get_close_matches(name, [*FLAGS, *VALUE_FLAGS], n=1)
            extra = f' (did you mean "{hint[0]}"?)' if hint else ""
            raise UserError(f"{arg}: unknown flag{extra} (known: {', '.join([*FLAGS, *VALUE_FLAGS])})")
    if "--dry-run" not in flags and any(name in flags for name in VALUE_FLAGS):
        name = next(name for name in VALUE_FLAGS if name in flags)
        raise UserError(f"{name}: only with --dry-run (a real run takes its ranks from torchrun)")
    return overrides, flags


def _report(error: Exception) -> None:
    """One line on stderr; under torchrun only rank 0 speaks (every rank sees the same error)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fsdpo: error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    status = main(sys.argv[1:])
    distributed = sys.modules.get("engine.distributed")
    if distributed is not None:  # a process group may have run: leave as exit_process explains
        distributed.exit_process(status)
    sys.exit(status)
