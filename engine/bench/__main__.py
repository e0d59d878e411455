"""`python -m engine.bench ...` (engine/bench/cli.py)."""

from engine.bench.cli import entry

if __name__ == "__main__":
    entry()
