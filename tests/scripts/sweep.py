"""Train several variants of one recipe in one process group; write their losses and weights.

    torchrun --nproc_per_node N tests/scripts/sweep.py RECIPE OUT_DIR RUNS.json [table.key=value ...]

(the tests fork its ranks from a warm process instead: conftest.launch_sweep, tests/forked.py)

RUNS.json maps a run name to a list of `table.key=value` overrides, or to {"overrides": [...],
"env": {NAME: VALUE}} for a run with environment variables of its own (testing hooks). Sharing
one launch across variants saves the start-up of each launch (tests compare batch splits,
losses, sharding).
Rank 0 prints RUN_LINE + the run's name before each run, so that a test can tell the runs' output
apart (tests/conftest.py:sweep_stdout).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from engine.distributed import exit_process, init_distributed, shutdown
from engine.export import full_hf_state_dict
from engine.recipe import load_config
from engine.trainer import Trainer

RUN_LINE = "sweep run: "


def main(recipe: str, out_dir: str, runs_file: str, common: list[str]) -> None:
    world = init_distributed()
    results = {}
    for name, run in json.loads(Path(runs_file).read_text()).items():
        overrides, env = (run, {}) if isinstance(run, list) else (run["overrides"], run["env"])
        run_dir = Path(out_dir) / name
        if world.is_main:
            print(f"{RUN_LINE}{name}", flush=True)
        cfg = load_config(recipe, [*common, *overrides, f"job.output_dir={run_dir}"])
        with mock.patch.dict(os.environ, env):
            trainer = Trainer(cfg, world)
            start = time.perf_counter()
            trainer.train()
            elapsed = time.perf_counter() - start
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights = full_hf_state_dict(trainer.model)
        if world.is_main:
            torch.save(weights, run_dir / "weights.pt")
        results[name] = {
            "losses": [r["loss"] for r in rows if "loss" in r],
            "reference_forwards": trainer.references.forwards,
            "wpo_weight": [r.get("wpo/weight") for r in rows if "loss" in r],
            "state_bytes": trainer.state_bytes,
            "seconds_per_step": elapsed / trainer.total_steps,
        }
        if world.is_main:  # after each run: a run killed on purpose leaves those before it
            (Path(out_dir) / "results.json").write_text(json.dumps(results))
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
