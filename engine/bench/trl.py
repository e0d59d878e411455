"""The TRL peer runner (`--against trl`): TRL's DPOTrainer on the bench's weights, pairs (in the
same order), batch and accumulation, configured at its fastest on this device (precomputed
reference, no gradient checkpointing, the compute dtype fsdpo uses), timed and counted as a
forward-mode run is (`engine.bench.modes.step_records`)."""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any

import torch

from engine.bench.common import build_causal_lm
from engine.bench.modes import Setup, step_pair_ids, step_records
from engine.data.sampler import BatchPlan
from engine.distributed import World
from engine.errors import UserError
from engine.metrics import model_shape, peak_memory_gib, reset_peak_memory, synchronize
from engine.parallel import compute_dtype


def import_trl():
    """The trl module, or a UserError saying how to install it."""
    try:
        import trl
    except ImportError:
        raise UserError("--against trl: TRL is not installed (pip install trl)") from None
    return trl


def run_trl(setup: Setup, world: World, tokenizer, timed: range) -> dict[str, Any]:
    """TRL's DPOTrainer on the same weights, pairs (same order), batch and accumulation: the
    warm-up steps, then the steps `timed`."""
    from datasets import Dataset
    from transformers import TrainerCallback

    trl = import_trl()
    cfg, device = setup.cfg, world.device
    t = cfg.training
    accumulation = BatchPlan.split(t.global_batch_size, t.micro_batch_size, 1).accumulation_steps
    step_indices = [*range(setup.warmup), *timed]
    total_steps = len(step_indices)
    order = [setup.pairs[i] for s in step_indices for i in step_pair_ids(setup, s)]
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [p for p, _, _ in order],
            "chosen_ids": [c for _, c, _ in order],
            "rejected_ids": [r for _, _, r in order],
        }
    )

    class PretokenizedDPOTrainer(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # already token ids, as fsdpo's
            return dataset

    class StepTimer(TrainerCallback):
        """Step times as intervals between step ends (data loading and collation included, as
        in fsdpo's steps); the first step is timed from its beginning."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.start = 0.0  # memory at the start of the timed steps

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == setup.warmup:
                gc.collect()
                reset_peak_memory(device)
                self.start = peak_memory_gib(device)
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.marks.append(time.perf_counter())

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out,
            per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=total_steps,
            learning_rate=cfg.optimizer.lr,
            weight_decay=cfg.optimizer.weight_decay,
            max_grad_norm=cfg.optimizer.max_grad_norm,
            lr_scheduler_type="constant",
            beta=cfg.loss.beta,
            max_length=cfg.data.max_length,
            precompute_ref_log_probs=True,
            gradient_checkpointing=False,
            bf16=compute_dtype(cfg.parallel, device) == torch.bfloat16,
            use_cpu=device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_steps=max(total_steps, 1),
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            seed=cfg.job.seed,
            disable_tqdm=True,
        )
        model = build_causal_lm(cfg, setup.model_overrides)
        trainer = PretokenizedDPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
        trainer.train()
        peak = peak_memory_gib(device)
    times = [b - a for a, b in zip(timer.marks, timer.marks[1:])][setup.warmup :]
    params = sum(p.numel() for p in model.parameters())
    # TRL's layout is concatenated's: 2B right-padded rows. Counted as fsdpo's (the LM head over
    # the scored positions), though TRL runs its head over every position: the same useful work
    records = step_records(
        "concatenated", setup, world, timed, times, (peak, timer.start), params, model_shape(model)
    )
    return {**records, "trl_version": trl.__version__}
