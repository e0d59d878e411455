"""Every loss trained for real: batch-split invariance across ranks, micro-batches and accumulation.

Two launches (1 rank x micro 8 x accumulation 1 with the concatenated forward; 2 ranks x micro 2
x accumulation 2 with the separate forward) each train every registered loss for 2 steps (3 for
the batch-coupled ones and the unpaired): the
pair-separable ones and the batch-coupled ones (defined over the global batch: KTO's z0 too) must agree;
TDPO with its live reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine import losses
from tests.conftest import base_tables, run_sweep, train_rows, write_recipe

pytestmark = pytest.mark.slow
STEPS = {False: 2, True: 3}  # by whether the loss is batch-coupled


def _coupled(spec: losses.LossSpec) -> bool:
    return not spec.pair_separable or spec.unpaired


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> dict:
    tmp = tmp_path_factory.mktemp("sweep")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"]["eval"] = []
    tables["training"]["max_steps"] = 3
    tables["export"] = {"enabled": False}
    # Adam divides each gradient by its own running RMS, which amplifies fp32 reduction-order
    # noise in elements whose gradient is ~0; at lr 1e-3 that reaches ~2e-5 after 3 steps.
    tables["optimizer"]["lr"] = 1e-4
    recipe = write_recipe(tmp / "sweep.toml", tables)
    # unpaired losses (kto) train on the same pairs split into desirable and undesirable examples,
    # at an lr that makes KTO's z0 positive by step 3 (0 before: clamped), so it is exercised
    unpaired = ["data.unpair=true", "optimizer.lr=3e-3"]
    # token-level KL losses (tdpo) run beside a live reference model
    live = ["reference.mode=live"]
    # pair-separable losses train 2 steps (the second after an update); the batch-coupled ones
    # 3, so that their running statistics and KTO's z0 carry over more than one step
    one = {
        name: [
            f"loss.type={name}",
            f"training.max_steps={STEPS[_coupled(spec)]}",
            *(unpaired if spec.unpaired else []),
            *(live if spec.needs_token_kl else []),
        ]
        for name, spec in losses.LOSSES.items()
    }
    two = {
        name: [*runs, "training.micro_batch_size=2", "training.forward_mode=separate"]
        for name, runs in one.items()
    }
    return {
        "one": run_sweep(recipe, tmp / "one", one, nproc=1) | {"_dir": str(tmp / "one")},
        "two": run_sweep(recipe, tmp / "two", two, nproc=2) | {"_dir": str(tmp / "two")},
    }


@pytest.mark.parametrize(
    "name", [n for n, spec in losses.LOSSES.items() if spec.pair_separable or spec.step_stats]
)
def test_losses_do_not_depend_on_the_batch_split(sweeps: dict, name: str, tiny_model_dir: Path) -> None:
    one, two = sweeps["one"][name], sweeps["two"][name]
    assert len(one["losses"]) == len(two["losses"]) == STEPS[_coupled(losses.LOSSES[name])]
    for a, b in zip(one["losses"], two["losses"]):
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (name, one, two)
    w1 = torch.load(Path(sweeps["one"]["_dir"]) / name / "weights.pt", weights_only=True)
    w2 = torch.load(Path(sweeps["two"]["_dir"]) / name / "weights.pt", weights_only=True)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")
    # the run actually trained: the weights moved away from the initial model
    from safetensors.torch import load_file

    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(w1[k], initial[k]) for k in initial), name


def test_kto_z0_is_of_the_global_batch(sweeps: dict) -> None:
    """z0 > 0 at step 3 (so the global-batch mean above is tested, not its clamp), the same for
    1 rank x micro 8 and 2 ranks x micro 2 x accumulation 2."""
    one, two = (train_rows(Path(sweeps[k]["_dir"]) / "kto") for k in ("one", "two"))
    assert one[-1]["kl"] > 0.1 and math.isclose(one[-1]["kl"], two[-1]["kl"], rel_tol=1e-5)


def test_reference_free_losses_never_compute_reference_logps(sweeps: dict) -> None:
    for name, spec in losses.LOSSES.items():
        expected = 1 if spec.needs_reference and not spec.needs_token_kl else 0  # live: no cache pass
        assert sweeps["one"][name]["reference_forwards"] == expected, name
        assert sweeps["two"][name]["reference_forwards"] == expected, name


def test_wpo_logs_its_mean_weight(sweeps: dict) -> None:
    weights = sweeps["two"]["wpo"]["wpo_weight"]
    assert all(w is not None and 0 < w <= 1 for w in weights)


def test_simpo_trainer_does_not_call_the_reference_forward(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import reference
    from engine import trainer as trainer_module
    from engine.recipe import load_config

    def forbidden(*args, **kwargs):
        raise AssertionError("SimPO must not compute reference log-probs")

    monkeypatch.setattr(reference, "compute_reference_logps", forbidden)
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, tmp_path / "out"))
    trainer = trainer_module.Trainer(
        load_config(recipe, ["loss.type=simpo", "training.max_steps=2", "export.enabled=false"]), world
    )
    trainer.train()
    assert trainer.train_reference is None and trainer.eval_reference is None
