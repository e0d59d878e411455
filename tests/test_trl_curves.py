"""5-step training curves equal to TRL 1.16's for every loss TRL also has (issue 18 point 8).

The same tiny random-init Llama, fp32 with dropout off, trains 5 optimizer steps of 4 pairs
(no accumulation, one process) under fsdpo's Trainer and under TRL's own trainer in this
process: DPOTrainer for its loss types, f-divergences, `ld_alpha` and `use_weighting`;
trl.experimental's CPOTrainer (cpo, SimPO, AlphaPO, CPO-SimPO) and ORPOTrainer. Both see the
same pairs in the same order (fsdpo's seeded shuffle, given to TRL as a sequential data set),
AdamW with the same lr, betas, eps and weight decay, the same linear decay without warmup and the
same gradient clipping. Each per-step loss (from fsdpo's metrics.jsonl and TRL's log history) and
the final weights must agree.

Tokenisation: every side tokenises the plain-string pairs itself, and the tests check that they
agree id for id. fsdpo tokenises the prompt and each completion apart and appends EOS; TRL
tokenises prompt + completion (+ the EOS text) and splits at the prompt's tokens. The two agree
where no token spans the boundary: here every prompt ends with a newline and completions are
digits. The demo tokenizer adds no BOS.

Conventions TRL differs in, fixed on the data side: TRL's `sft` and CPO's NLL are one token mean
over the batch's chosen completions, fsdpo's the mean over pairs of each pair's token mean; every
chosen completion here has the same length, where the two are equal. ORPOTrainer's NLL covers the
prompt tokens too (the paper's code): its pairs have a one-token prompt, which has no scored
position. TRL 1.16's `sigmoid` has no label smoothing, so `dpo` runs without it. TRL's warmup
starts at lr 0 (step / warmup) and fsdpo's does not ((step + 1) / (warmup + 1)): no warmup here.
"""

from __future__ import annotations

import copy
import gc
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import save_random_llama, train_rows, write_recipe

trl = pytest.importorskip("trl")

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'"),
    # TRL 1.16 calls transformers' gradient_checkpointing names, deprecated for activation_checkpointing
    pytest.mark.filterwarnings(
        "ignore:`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated:FutureWarning"
    ),
]

STEPS, BATCH = 5, 4
SEED = 3
BETA = 0.5
OPTIMIZER = {"lr": 2e-3, "weight_decay": 0.01, "betas": [0.9, 0.95], "eps": 1e-6, "max_grad_norm": 0.5}
MAX_LENGTH = 64
CHOSEN_TOKENS = 4  # every chosen completion: 4 digit tokens + EOS


# ----------------------------------------------------------------------------------------------
# The model and the pairs


@pytest.fixture(scope="module")
def curve_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer Llama of hidden size 32 with the demo tokenizer, saved once."""
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip
    return save_random_llama(tmp_path_factory.mktemp("curve-llama"), shape, std=0.2)


def _numbers(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(1, 40) for _ in range(count)]


def _make_pairs(tokenizer, prompt_of, count: int) -> list[dict[str, str]]:
    """`count` sorting pairs whose chosen completion is CHOSEN_TOKENS tokens and whose rejected one
    is 1-7 tokens, each tokenised the same as a whole and as prompt + completion."""
    rng = random.Random(SEED)
    pairs: list[dict[str, str]] = []

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    while len(pairs) < count:
        numbers = _numbers(rng, rng.randrange(2, 6))
        prompt = prompt_of(numbers)
        chosen = " ".join(map(str, [*sorted(numbers)[:3], rng.randrange(1, 9)]))
        rejected = " ".join(map(str, _numbers(rng, rng.randrange(1, 7))))
        ok = len(tokens(chosen)) == CHOSEN_TOKENS and chosen != rejected
        ok = ok and all(tokens(prompt + c) == tokens(prompt) + tokens(c) for c in (chosen, rejected))
        if ok:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


@pytest.fixture(scope="module")
def data(curve_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """20 pairs (5 steps of 4) as a JSON lines file and as rows in fsdpo's training order, with
    multi-token prompts ("pairs") and with one-token prompts for ORPO ("orpo")."""
    from transformers import AutoTokenizer

    from engine.data.sampler import GlobalBatchSampler

    tokenizer = AutoTokenizer.from_pretrained(curve_model)
    out = tmp_path_factory.mktemp("curve-data")
    sampler = GlobalBatchSampler(STEPS * BATCH, BATCH, BATCH, 0, 1, SEED)
    order = [i for step in range(STEPS) for batch in sampler.micro_batches(step) for i in batch]
    found: dict[str, Any] = {"order": order, "reference": out / "reference"}
    prompts = {
        "pairs": lambda numbers: "Sort: " + " ".join(map(str, numbers)) + "\n",
        "orpo": lambda numbers: "\n",
    }
    for name, prompt_of in prompts.items():
        pairs = _make_pairs(tokenizer, prompt_of, STEPS * BATCH)
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        found[name] = {"path": path, "rows": [pairs[i] for i in order]}
    return found


# ----------------------------------------------------------------------------------------------
# fsdpo's side


def fsdpo_recipe(
    curve_model: Path, data_path: Path, loss: dict[str, Any], out: Path, reference: Path
) -> Path:
    """The recipe of a run into `out` with the `[loss]` table `loss` (and beta = BETA), written
    beside it; `reference` is the reference cache's folder, shared by the runs."""
    tables = {
        "job": {"output_dir": str(out), "seed": SEED},
        "model": {"path": str(curve_model)},
        "data": {"train": [str(data_path)], "max_length": MAX_LENGTH},
        "loss": {"beta": BETA, **loss},
        "training": {"global_batch_size": BATCH, "micro_batch_size": BATCH, "max_steps": STEPS},
        "optimizer": OPTIMIZER,
        "scheduler": {"type": "linear", "warmup_steps": 0},
        "parallel": {"mixed_precision": "fp32"},
        "reference": {"cache_dir": str(reference)},
        "export": {"enabled": False},
    }
    return write_recipe(out.parent / f"{out.name}.toml", tables)


def fsdpo_curve(
    world, curve_model: Path, data_path: Path, loss: dict[str, Any], out: Path, reference: Path
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """fsdpo's per-step losses (metrics.jsonl) and final weights for the `[loss]` table `loss`."""
    from engine.export import full_hf_state_dict
    from engine.recipe import load_config
    from engine.trainer import Trainer

    trainer = Trainer(load_config(fsdpo_recipe(curve_model, data_path, loss, out, reference)), world)
    trainer.train()
    return [row["loss"] for row in train_rows(out)], full_hf_state_dict(trainer.model)


# ----------------------------------------------------------------------------------------------
# TRL's side: one trainer per class, reset between runs


def _training_args(out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "learning_rate": OPTIMIZER["lr"],
        "weight_decay": OPTIMIZER["weight_decay"],
        "adam_beta1": OPTIMIZER["betas"][0],
        "adam_beta2": OPTIMIZER["betas"][1],
        "adam_epsilon": OPTIMIZER["eps"],
        "max_grad_norm": OPTIMIZER["max_grad_norm"],
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "beta": BETA,
        "max_length": MAX_LENGTH,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "seed": SEED,
    }


class TrlRuns:
    """A TRL trainer built once; `curve` resets its model to the initial weights, drops its
    optimizer and scheduler (rebuilt by `train`), sets the loss attributes its __init__ reads from
    its config, and trains."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.initial = copy.deepcopy(trainer.model.state_dict())

    def curve(self, **attributes: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
        trainer = self.trainer
        trainer.model.load_state_dict(self.initial)
        trainer.optimizer, trainer.lr_scheduler = None, None
        for name, value in attributes.items():
            target = trainer.args if name == "discopop_tau" else trainer
            assert hasattr(target, name), f"TRL's {type(trainer).__name__} has no {name!r}"
            setattr(target, name, value)
        gc.freeze()  # train() starts with accelerate's gc.collect(): spare it the test process's heap
        try:
            trainer.train()
        finally:
            gc.unfreeze()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _trl_model(curve_model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(curve_model, dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def trl_dpo(curve_model: Path, data: dict, tmp_path_factory: pytest.TempPathFactory) -> TrlRuns:
    """TRL's DPOTrainer with a reference model (the initial weights, kept frozen: so `ld_alpha`
    weights its log-probs too) and `use_weighting` on at construction (which adds WPO's
    log_sum_sq_probs to its fused head; the flag itself is set per run)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    args = trl.DPOConfig(**_training_args(tmp_path_factory.mktemp("trl-dpo")), use_weighting=True)
    trainer = trl.DPOTrainer(
        model=_trl_model(curve_model),
        ref_model=_trl_model(curve_model),
        args=args,
        train_dataset=Dataset.from_list(data["pairs"]["rows"]),
        processing_class=AutoTokenizer.from_pretrained(curve_model),
    )
    return TrlRuns(trainer)


@pytest.fixture(scope="module")
def trl_cpo(curve_model: Path, data: dict, tmp_path_factory: pytest.TempPathFactory) -> TrlRuns:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # loss_type "simpo" at construction: only then does CPOTrainer keep `simpo_gamma`
    args = CPOConfig(**_training_args(tmp_path_factory.mktemp("trl-cpo")), loss_type="simpo")
    trainer = CPOTrainer(
        model=_trl_model(curve_model),
        args=args,
        train_dataset=Dataset.from_list(data["pairs"]["rows"]),
        processing_class=AutoTokenizer.from_pretrained(curve_model),
    )
    return TrlRuns(trainer)


@pytest.fixture(scope="module")
def trl_orpo(curve_model: Path, data: dict, tmp_path_factory: pytest.TempPathFactory) -> TrlRuns:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**_training_args(tmp_path_factory.mktemp("trl-orpo")))
    trainer = ORPOTrainer(
        model=_trl_model(curve_model),
        args=args,
        train_dataset=Dataset.from_list(data["orpo"]["rows"]),
        processing_class=AutoTokenizer.from_pretrained(curve_model),
    )
    return TrlRuns(trainer)


# ----------------------------------------------------------------------------------------------
# The comparison


def assert_same_curve(
    name: str,
    ours: tuple[list[float], dict[str, torch.Tensor]],
    theirs: tuple[list[float], dict[str, torch.Tensor]],
) -> None:
    """The per-step losses agree to 1e-4 (relative for a curve below 1, e.g. WPO's ~0.03), and the
    final weights to 1e-4; the curve moved."""
    (our_losses, our_weights), (their_losses, their_weights) = ours, theirs
    assert len(our_losses) == len(their_losses) == STEPS, (name, our_losses, their_losses)
    torch.testing.assert_close(
        torch.tensor(our_losses, dtype=torch.float64),
        torch.tensor(their_losses, dtype=torch.float64),
        rtol=0,
        atol=1e-4 * min(1.0, max(abs(loss) for loss in their_losses)),
        msg=lambda m: f"{name}: fsdpo {our_losses} vs TRL {their_losses}\n{m}",
    )
    assert our_losses[0] != our_losses[-1], f"{name}: the curve did not move ({our_losses})"
    assert our_weights.keys() == their_weights.keys()
    for key, value in our_weights.items():
        torch.testing.assert_close(value, their_weights[key], rtol=0, atol=1e-4, msg=f"{name}: {key}")


LS = 0.1  # label smoothing of the losses that read it

# name: (fsdpo's [loss] table, TRL DPOTrainer's attributes)
DPO_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sigmoid": ({"type": "dpo"}, {"loss_types": ["sigmoid"]}),
    "sigmoid_norm": ({"type": "dpo_norm"}, {"loss_types": ["sigmoid_norm"]}),
    "hinge": ({"type": "hinge"}, {"loss_types": ["hinge"]}),
    "ipo": ({"type": "ipo"}, {"loss_types": ["ipo"]}),
    "robust": ({"type": "robust", "label_smoothing": LS}, {"loss_types": ["robust"], "label_smoothing": LS}),
    "exo_pair": (
        {"type": "exo_pair", "label_smoothing": LS},
        {"loss_types": ["exo_pair"], "label_smoothing": LS},
    ),
    "nca_pair": ({"type": "nca_pair"}, {"loss_types": ["nca_pair"]}),
    "bco_pair": ({"type": "bco_pair"}, {"loss_types": ["bco_pair"]}),
    "sppo_hard": ({"type": "sppo_hard"}, {"loss_types": ["sppo_hard"]}),
    "aot": ({"type": "aot", "label_smoothing": LS}, {"loss_types": ["aot"], "label_smoothing": LS}),
    "aot_unpaired": (
        {"type": "aot_unpaired", "label_smoothing": LS},
        {"loss_types": ["aot_unpaired"], "label_smoothing": LS},
    ),
    "apo_zero": ({"type": "apo_zero"}, {"loss_types": ["apo_zero"]}),
    "apo_down": ({"type": "apo_down"}, {"loss_types": ["apo_down"]}),
    "discopop": (
        {"type": "discopop", "discopop_tau": 0.2},
        {"loss_types": ["discopop"], "discopop_tau": 0.2},
    ),
    "sft": ({"type": "sft"}, {"loss_types": ["sft"]}),
    "mpo": (  # a weighted mix: MPO's (Wang et al. 2024) as TRL documents it; RPO is ["dpo", "sft"]
        {"type": ["dpo", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]},
        {"loss_types": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    ),
    "forward_kl": (
        {"type": "dpo", "f_divergence": "forward_kl"},
        {"loss_types": ["sigmoid"], "f_divergence_type": "forward_kl"},
    ),
    "js_divergence": (
        {"type": "hinge", "f_divergence": "js_divergence"},
        {"loss_types": ["hinge"], "f_divergence_type": "js_divergence"},
    ),
    "alpha_divergence": (  # TRL's coefficient is 1 - the paper's alpha
        {"type": "ipo", "f_divergence": "alpha_divergence", "f_alpha": 0.3},
        {"loss_types": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7},
    ),
    "ld_alpha": ({"type": "dpo", "ld_alpha": 0.5}, {"loss_types": ["sigmoid"], "ld_alpha": 0.5}),
    "use_weighting": (  # TRL's WPO weight is unclamped
        {"type": "wpo", "wpo_clamp": False},
        {"loss_types": ["sigmoid"], "use_weighting": True},
    ),
}
# what each DPO case resets to on TRL's trainer (the DPOConfig defaults)
_DPO_DEFAULTS = {
    "loss_weights": None,
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "ld_alpha": None,
    "use_weighting": False,
    "discopop_tau": 0.05,
}


@pytest.mark.parametrize("name", list(DPO_CASES))
def test_dpo_trainer_curves(
    name: str, world, curve_model: Path, data: dict, trl_dpo: TrlRuns, tmp_path: Path
) -> None:
    ours, theirs = DPO_CASES[name]
    settings = _DPO_DEFAULTS | theirs
    settings["loss_weights"] = settings["loss_weights"] or [1.0] * len(settings["loss_types"])
    their_curve = trl_dpo.curve(**settings)
    our_curve = fsdpo_curve(
        world, curve_model, data["pairs"]["path"], ours, tmp_path / "run", data["reference"]
    )
    assert_same_curve(name, our_curve, their_curve)


# name: (fsdpo's [loss] table, TRL CPOTrainer's attributes); CPO's NLL weight is cpo_alpha
CPO_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cpo": (
        {"type": "cpo", "label_smoothing": LS},
        {"loss_type": "sigmoid", "label_smoothing": LS, "cpo_alpha": 1.0},
    ),
    "cpo+alpha": (  # AlphaPO's reward shape on CPO's summed log-probs, as TRL applies it
        {"type": "cpo", "cpo_alpha": 0.5, "alphapo_alpha": 0.05},
        {"loss_type": "sigmoid", "cpo_alpha": 0.5, "alpha": 0.05},
    ),
    "simpo": (
        {"type": "simpo", "label_smoothing": LS, "gamma_beta_ratio": 0.4},
        {"loss_type": "simpo", "label_smoothing": LS, "simpo_gamma": 0.4 * BETA},
    ),
    "alphapo": ({"type": "simpo", "alphapo_alpha": 0.25}, {"loss_type": "simpo", "alpha": 0.25}),
    "cpo_simpo": (
        {"type": ["simpo", "sft"], "weights": [1.0, 0.5]},
        {"loss_type": "simpo", "cpo_alpha": 0.5},
    ),
}
_CPO_DEFAULTS = {"label_smoothing": 0.0, "cpo_alpha": 0.0, "alpha": 0.0, "simpo_gamma": 0.5 * BETA}


@pytest.mark.parametrize("name", list(CPO_CASES))
def test_cpo_trainer_curves(
    name: str, world, curve_model: Path, data: dict, trl_cpo: TrlRuns, tmp_path: Path
) -> None:
    ours, theirs = CPO_CASES[name]
    their_curve = trl_cpo.curve(**(_CPO_DEFAULTS | theirs))
    our_curve = fsdpo_curve(
        world, curve_model, data["pairs"]["path"], ours, tmp_path / "run", data["reference"]
    )
    assert_same_curve(name, our_curve, their_curve)


def test_orpo_trainer_curve(world, curve_model: Path, data: dict, trl_orpo: TrlRuns, tmp_path: Path) -> None:
    """ORPOTrainer's `beta` is the paper's lambda (`loss.orpo_lambda`)."""
    their_curve = trl_orpo.curve()
    ours = {"type": "orpo", "orpo_lambda": BETA}
    our_curve = fsdpo_curve(
        world, curve_model, data["orpo"]["path"], ours, tmp_path / "run", data["reference"]
    )
    assert_same_curve("orpo", our_curve, their_curve)


def test_both_sides_train_on_the_same_token_ids_in_the_same_order(
    world,
    curve_model: Path,
    data: dict,
    trl_dpo: TrlRuns,
    trl_cpo: TrlRuns,
    trl_orpo: TrlRuns,
    tmp_path: Path,
) -> None:
    """Each TRL trainer's tokenised data set, read in order, is fsdpo's pairs in the order fsdpo's
    sampler gives them: DPOTrainer's prompt and completion ids (EOS included), CPOTrainer's and
    ORPOTrainer's prompt + completion rows and their labels (the prompt masked)."""
    from engine.recipe import load_config
    from engine.trainer import build_data, build_sampler

    for name, trainers in {"pairs": [trl_dpo, trl_cpo], "orpo": [trl_orpo]}.items():
        recipe = fsdpo_recipe(
            curve_model, data[name]["path"], {"type": "sft"}, tmp_path / name, data["reference"]
        )
        cfg = load_config(recipe)
        _, train_data, _ = build_data(cfg)
        sampler = build_sampler(cfg, train_data, world)
        order = [i for step in range(STEPS) for batch in sampler.micro_batches(step) for i in batch]
        assert order == data["order"]
        ours = [train_data.pairs[i] for i in order]
        chosen = CHOSEN_TOKENS + 1  # with EOS
        assert all(len(pair.chosen_ids) == chosen for pair in ours)
        rejected = {len(pair.rejected_ids) for pair in ours}
        assert min(rejected) < chosen < max(rejected)  # LD-DPO's tails on either side
        if name == "orpo":  # ORPO's NLL over prompt + completion then scores the completion alone
            assert all(len(pair.prompt_ids) == 1 for pair in ours)
        for trainer in (runs.trainer for runs in trainers):
            theirs = trainer.train_dataset
            if isinstance(trainer, trl.DPOTrainer):
                for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
                    assert theirs[column] == [getattr(pair, column) for pair in ours], column
                continue
            assert theirs["prompt_input_ids"] == [pair.prompt_ids for pair in ours]
            for side in ("chosen", "rejected"):
                completions = [getattr(pair, f"{side}_ids") for pair in ours]
                rows = [pair.prompt_ids + ids for pair, ids in zip(ours, completions)]
                labels = [[-100] * len(pair.prompt_ids) + ids for pair, ids in zip(ours, completions)]
                assert theirs[f"{side}_input_ids"] == rows, side
                assert theirs[f"{side}_labels"] == labels, side
