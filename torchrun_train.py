"""fsdpo entry point.

    torchrun --nproc_per_node N torchrun_train.py RECIPE.toml [table.key=value ...]
    python torchrun_train.py RECIPE.toml [table.key=value ...]      (one process)

Flags (anywhere after the recipe):
    --build-reference-only   build the reference log-prob cache and exit

Exit code 0 on success, 2 on a user error (one line on stderr naming the key, file or row).
"""

from __future__ import annotations

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

        flags = {a for a in argv[1:] if a.startswith("--")}
        unknown = flags - {"--build-reference-only"}
        if unknown:
            raise UserError(f"{sorted(unknown)[0]}: unknown flag (known: --build-reference-only)")
        cfg = load_config(argv[0], [a for a in argv[1:] if not a.startswith("--")])
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


def _report(error: Exception) -> None:
    """One line on stderr; under torchrun only rank 0 speaks (every rank sees the same error)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fsdpo: error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
