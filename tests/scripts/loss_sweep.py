"""Train every registered loss for a few steps in one process group; write losses and weights.

    torchrun --nproc_per_node N tests/scripts/loss_sweep.py RECIPE OUT_DIR [overrides...]

Used by tests/test_losses_training.py to compare batch splits without one launch per loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine import losses
from engine.config import load_config
from engine.distributed import init_distributed, shutdown
from engine.export import full_hf_state_dict
from engine.trainer import Trainer


def main(recipe: str, out_dir: str, overrides: list[str]) -> None:
    world = init_distributed()
    results = {}
    for name in losses.LOSSES:
        run_dir = Path(out_dir) / name
        cfg = load_config(recipe, [*overrides, f"loss.type={name}", f"job.output_dir={run_dir}"])
        trainer = Trainer(cfg, world)
        trainer.train()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights = full_hf_state_dict(trainer.model)
        if world.is_main:
            torch.save(weights, run_dir / "weights.pt")
        results[name] = {
            "losses": [r["loss"] for r in rows if "loss" in r],
            "reference_forwards": trainer.reference_forwards,
            "wpo_weight": [r.get("wpo/weight") for r in rows if "loss" in r],
        }
    if world.is_main:
        (Path(out_dir) / "results.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
