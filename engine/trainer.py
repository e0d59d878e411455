"""The training loop: build everything from the recipe, then train, evaluate and export.

Why the loss is divided by the global pair count: every micro-batch contributes
sum(per-pair losses) / global_batch_size and FSDP *sums* gradients across ranks (its averaging
is switched off in parallel.py), so the optimizer sees the mean over the global batch however
it is split into ranks x micro-batches x accumulation steps.

Each rule has its component: the checkpoint manager decides when to save and saves the model,
optimizer and scheduler (`engine.checkpoint`); the reference provider keys, loads, computes and
saves the reference log-probs (`engine.reference`); the throughput meter times the logging
window and counts its work (`engine.metrics`); post-training exports final/ at the end of
`train()`, and `engine.post_train.finish` pushes and runs the command once the process group is
gone. `build_reference_cache` builds the reference cache alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedTokenizerBase

from engine import losses
from engine.attention import kernel_plan
from engine.checkpoint import CheckpointManager, TrainerState, resume_path
from engine.config import Config
from engine.data import (
    GlobalBatchSampler,
    PreferenceDataset,
    build_dataset,
    collate,
    resolve_chat_template,
    shard_for_inference,
    split_eval,
    unpaired_examples,
)
from engine.distributed import Interrupted, World, log, stopping_at
from engine.errors import UserError
from engine.forward import FORWARD_MODES, padding_fraction
from engine.metrics import MetricsLogger, PairMetrics, ThroughputMeter, format_rate, format_row
from engine.model import build_tokenizer
from engine.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from engine.parallel import check_compiler, compute_dtype
from engine.post_train import export_final
from engine.progress import Progress
from engine.recipe import to_toml
from engine.reference import ReferenceProvider
from engine.run_dir import RunDir, check_output_dir, prepare_output_dir
from engine.sequence_parallel import data_parallel, tokens_per_rank
from engine.step import TrainStep, build_live_reference, build_model


def startup_warnings(cfg: Config, total_steps: int, sampler: GlobalBatchSampler) -> list[str]:
    """Start-up lines about a recipe that runs but likely not as meant: a warmup as long as the
    run, and pairs that fill no whole global batch (each epoch leaves them out)."""
    lines = []
    s, lr = cfg.scheduler, cfg.optimizer.lr
    warmup = warmup_steps(total_steps, s)
    if warmup >= total_steps:
        key = (
            f"warmup_steps={warmup}" if s.warmup_steps else f"warmup_ratio={s.warmup_ratio} ({warmup} steps)"
        )
        top = lr * lr_factor(total_steps - 1, total_steps, s)
        lines.append(
            f"warning: scheduler.{key} is not below the {total_steps} training steps: the learning rate "
            f"only warms up, to {top:.4g} at the last step, and never reaches optimizer.lr={lr:g}"
        )
    if sampler.unused_per_epoch:
        gbs, pairs = sampler.global_batch_size, sampler.num_pairs
        lines.append(
            f"data: {sampler.unused_per_epoch} of the {pairs} training pairs are left out of each epoch "
            f"({sampler.steps_per_epoch} whole global batches of training.global_batch_size={gbs}; "
            "a different random set each epoch)"
        )
    return lines


def build_data(cfg: Config) -> tuple[PreTrainedTokenizerBase, PreferenceDataset, PreferenceDataset | None]:
    """(The tokenizer, the training set, the evaluation set or None), the tokenizer with the
    recipe's chat template (trained with it, so exported with it)."""
    tokenizer = build_tokenizer(cfg.model)
    template = resolve_chat_template(cfg.data.chat_template)
    if template:
        tokenizer.chat_template = template
    unpaired = losses.unpaired(cfg.loss)
    train_data = build_dataset(cfg.data.train, tokenizer, cfg.data, cfg.job.seed, unpaired=unpaired)
    eval_data = None
    if cfg.data.eval:
        eval_data = build_dataset(cfg.data.eval, tokenizer, cfg.data, cfg.job.seed, unpaired=unpaired)
    elif cfg.data.eval_fraction > 0:
        train_data, eval_data = split_eval(train_data, cfg.data.eval_fraction, cfg.job.seed)
    if unpaired:  # after the split: a KL completion is from the example's own set
        kl = losses.kl_sequences(cfg.loss)
        train_data = unpaired_examples(train_data, cfg.data, cfg.job.seed, "data.train", kl=kl)
        if eval_data is not None:
            eval_data = unpaired_examples(eval_data, cfg.data, cfg.job.seed, "data.eval", kl=kl)
    log(train_data.summary())
    return tokenizer, train_data, eval_data


def build_sampler(cfg: Config, train_data: PreferenceDataset, world: World) -> GlobalBatchSampler:
    """This rank's share of every global batch, in micro-batches of pairs or of tokens (a sequence
    group's ranks share one: `engine.sequence_parallel.data_parallel`)."""
    t, d = cfg.training, cfg.data
    rank, size = data_parallel(world.rank, world.world_size, cfg.parallel.sequence_parallel)
    return GlobalBatchSampler(
        len(train_data), t.global_batch_size, t.micro_batch_size, rank, size, cfg.job.seed,
        lengths=train_data.sequence_lengths() if d.group_by_length else None,
        group_by_length=d.group_by_length,
        micro_batch_tokens=t.micro_batch_tokens,
        pair_tokens=FORWARD_MODES[t.forward_mode].pair_positions(train_data.lengths()) if t.micro_batch_tokens else None,
    )  # fmt: skip


def attention_plan(cfg: Config, causal_lm: nn.Module, world: World, dtype: torch.dtype) -> dict[str, str]:
    """The attention kernel of each layer kind (logged): a padding-free mode's segment kernels
    (a forced one that is missing stops here), else transformers' `model.attn_implementation`."""
    t = cfg.training
    if FORWARD_MODES[t.forward_mode].padding_free:
        plan = kernel_plan(causal_lm.config, world.device, dtype, t.attention_kernel)
    else:
        plan = {"all layers": f"transformers {cfg.model.attn_implementation}"}
    log(f"attention ({t.forward_mode}): " + ", ".join(f"{kind} {k}" for kind, k in plan.items()))
    return plan


def build_reference_cache(cfg: Config, world: World) -> None:
    """Collective: the reference log-prob cache of the recipe's data sets and nothing else, for
    precomputing it on other hardware (no checkpoint is read, nothing else is written)."""
    if cfg.reference.mode == "live":
        raise UserError(
            'reference.mode = "live": --build-reference-only has nothing to cache, a live reference '
            'is run beside the policy on every micro-batch (the cache serves reference.mode = "cached")'
        )
    if not losses.needs_reference(cfg.loss):
        raise UserError(
            f"loss.type {losses.loss_names(cfg.loss)}: --build-reference-only has nothing to cache, "
            "the loss uses no reference model"
        )
    check_compiler(cfg.parallel, world.device.type)
    torch.manual_seed(cfg.job.seed)
    tokenizer, train_data, eval_data = build_data(cfg)
    model, _ = build_model(cfg, world)
    dtype = compute_dtype(cfg.parallel, world.device)
    attention_plan(cfg, model.causal_lm, world, dtype)
    references = ReferenceProvider(cfg, model, tokenizer, world, dtype)
    references.get(train_data, "train", cfg.data.train)
    references.get(eval_data, "eval", cfg.data.eval)


class Trainer:
    """Builds every component from its own recipe table, then `train()` runs the loop."""

    def __init__(self, cfg: Config, world: World) -> None:
        self.cfg, self.world = cfg, world
        t = cfg.training
        self.output_dir = Path(cfg.job.output_dir)
        self.run_dir = RunDir(self.output_dir, world.is_main)  # the files fsdpo wrote there
        resume_from = resume_path(cfg.checkpoint, self.output_dir)
        # look now; change the folder only once every input has loaded
        check_output_dir(self.output_dir, cfg.job.overwrite, resume_from is not None)
        check_compiler(cfg.parallel, world.device.type)  # before hours of loading, not after
        torch.manual_seed(cfg.job.seed)

        self.tokenizer, self.train_data, self.eval_data = build_data(cfg)
        self.pad_id = self.tokenizer.pad_token_id
        self.data_rank = data_parallel(world.rank, world.world_size, cfg.parallel.sequence_parallel)
        self.pair_lengths = self.train_data.lengths()
        self.sampler = build_sampler(cfg, self.train_data, world)
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.sampler.steps_per_epoch
        for line in startup_warnings(cfg, self.total_steps, self.sampler):
            log(line)

        # pretrained safetensors: parameters start on the meta device and every rank reads only
        # its own shards after sharding (no rank ever holds the whole model)
        self.model, mesh = build_model(cfg, world)
        causal_lm = self.model.causal_lm
        self.num_params = sum(p.numel() for p in causal_lm.parameters())  # global, of the shards
        self.trainable_params = sum(p.numel() for p in causal_lm.parameters() if p.requires_grad)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.scheduler)
        self.dtype = compute_dtype(cfg.parallel, world.device)
        self.attention = attention_plan(cfg, causal_lm, world, self.dtype)

        # reference log-probs, from the initial weights (so before any checkpoint is loaded)
        self.references = ReferenceProvider(
            cfg, self.model, self.tokenizer, world, self.dtype, resume_from is not None
        )
        self.train_reference = self.references.get(self.train_data, "train", cfg.data.train)
        self.eval_reference = self.references.get(self.eval_data, "eval", cfg.data.eval)
        self.live = build_live_reference(cfg, world, self.model)  # reference.mode = "live"
        self.step = TrainStep(
            self.model, self.optimizer, self.scheduler, cfg, world.device, self.pad_id, self.train_reference,
            live=self.live,
        )  # fmt: skip
        self.state_bytes: dict[str, int] | None = None  # this rank's state, once the first update made it

        self.checkpoints = CheckpointManager(
            self.run_dir, cfg.checkpoint, world, self.model, self.optimizer, self.scheduler,
            self.sampler.steps_per_epoch, to_toml(cfg), self.step.loss_state,
            self.live.model if self.live is not None and self.live.sync_steps else None,
        )  # fmt: skip
        self.state = TrainerState(
            global_batch_size=t.global_batch_size, world_size=world.world_size, total_steps=self.total_steps
        )
        if resume_from is not None:
            self.state = self.checkpoints.resume(resume_from, self.state)
        prepare_output_dir(self.run_dir, cfg.job.overwrite, self.state.step if resume_from else None)
        if world.is_main:
            self._write_run_files()
        self.meter = ThroughputMeter(t.forward_mode, causal_lm, world.device, self.dtype, world.world_size)
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, world.is_main, dataclasses.asdict(cfg))
        log(self._summary(mesh.shape))

    def _summary(self, mesh_shape: tuple[int, ...]) -> str:
        """The start-up line: model size, ranks, sharding, batching, steps, dtype, MFU peak."""
        t = self.cfg.training
        n = self.cfg.parallel.sequence_parallel
        if t.micro_batch_tokens:
            # the budget is the whole row of a sequence group, of which each rank holds 1/n
            held = (
                f", {tokens_per_rank(t.micro_batch_tokens, n)} per rank of a sequence group" if n > 1 else ""
            )
            batching = (
                f"micro-batches of up to {t.micro_batch_tokens} tokens{held} "
                "(as many per step as the fullest rank needs)"
            )
        else:
            batching = f"{self.sampler.accumulation_steps} accumulation steps of {t.micro_batch_size} pairs"
        peak = self.meter.peak
        groups = f" (data {self.data_rank[1]} x sequence {n}: each row split over {n} ranks)" if n > 1 else ""
        return (
            f"model: {self.num_params / 1e6:.2f}M parameters ({self.trainable_params / 1e6:.2f}M trained), "
            f"{self.world.world_size} ranks{groups}, sharding {self.cfg.parallel.sharding} over mesh {tuple(mesh_shape)}, "
            f"{batching}, {self.total_steps} steps, compute {self.dtype}, "
            f"MFU peak {format_rate(peak.flops)} per rank ({peak.why})"
        )

    def _write_run_files(self) -> None:
        """output_dir/recipe.toml, the resolved recipe, and output_dir/data_stats.json: per-source
        filter counts, token-length percentiles, and the padding fraction each padded forward mode
        would pay at this batch size."""
        t, d = self.cfg.training, self.cfg.data
        padding = {
            mode: padding_fraction(
                self.train_data,
                t.micro_batch_size,
                mode,
                global_batch_size=t.global_batch_size,
                group_by_length=d.group_by_length,
                seed=self.cfg.job.seed,
            )
            for mode, forward in FORWARD_MODES.items()
            if not forward.padding_free
        }
        stats = {
            "train": self.train_data.stats,
            "eval": self.eval_data.stats if self.eval_data is not None else None,
            "padding_fraction": padding,
            "attention_kernels": self.attention,
            "batches": {
                "global_batch_size": t.global_batch_size,
                "steps_per_epoch": self.sampler.steps_per_epoch,
                "unused_pairs_per_epoch": self.sampler.unused_per_epoch,
            },
        }
        (self.output_dir / "recipe.toml").write_text(to_toml(self.cfg))
        (self.output_dir / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        self.run_dir.record(self.output_dir / "recipe.toml", self.output_dir / "data_stats.json")

    # ------------------------------------------------------------------------------------------

    def train_step(self, step: int, window: PairMetrics) -> tuple[float, torch.Tensor, bool, int]:
        """One optimizer step over this rank's micro-batches (`engine.step.TrainStep`). Returns
        (lr, grad norm: a 0-d tensor, read it when logging; skipped, stop): `stop` is the stop
        signal some rank received (0: none), the same on every rank."""
        micro_batches = self.sampler.micro_batches(step)
        batches = [collate(self.train_data, indices) for indices in micro_batches]
        result = self.step(batches, window, poison=_fault_nan_step() == step + 1)
        if self.live is not None and self.live.due(step + 1):  # TR-DPO
            self.live.sync(self.model)
        for indices in micro_batches:
            self.meter.add(self.pair_lengths[indices])
        if self.step.state_bytes is not None and self.state_bytes is None:  # the first update
            self.state_bytes = self.step.state_bytes
            mib = {k: f"{v / 2**20:.2f} MiB" for k, v in self.state_bytes.items()}
            print(
                f"[rank {self.world.rank}] local state under sharding={self.cfg.parallel.sharding}: {mib}",
                flush=True,
            )
        return result.lr, result.grad_norm, result.skipped, result.stop

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any] | None:
        if self.eval_data is None:
            return None
        self.model.eval()
        window = PairMetrics()
        shards = shard_for_inference(len(self.eval_data), self.references.batch_size, *self.data_rank)
        progress = Progress(len(shards), f"eval at step {step}", "batch", enabled=self.world.is_main)
        for indices, valid in shards:
            micro = self.step.prepare(collate(self.eval_data, indices, valid))
            logps, out, pair_losses = self.step.pair_losses(micro, self.eval_reference)
            window.add(pair_losses, out, logps, self.step.counted(micro.valid))
            progress.update()
        progress.close()
        self.model.train()
        reduced = window.reduce(self.world.device)
        row = {"step": step, **{f"eval/{k}": v for k, v in reduced.items() if k != "pairs"}}
        self.metrics.write(row)
        log(format_row(row))
        return row

    def train(self) -> dict[str, Any]:
        """Evaluate, train from `state.step` to the last step (rows, evaluations, checkpoints),
        evaluate again and export final/ (collective)."""
        state, total, t = self.state, self.total_steps, self.cfg.training
        self.model.train()
        stopping_at("during the evaluation at step 0")
        before = self.evaluate(0) if state.step == 0 else None
        window, row = PairMetrics(), {}
        progress = Progress(total, "training", "step", enabled=self.world.is_main)
        progress.update(state.step)
        self.meter.start()
        stopping_at(f"at step {state.step}", deferred=True)  # a stop signal waits for the step's end
        for step in range(state.step, total):
            lr, grad_norm, skipped, stop = self.train_step(step, window)
            progress.update(
                1, loss=f"{row.get('loss', float('nan')):.4f}", acc=f"{row.get('rewards/accuracies', 0):.3f}"
            )
            _fault_kill_at_step(step + 1)
            done = self._advance(step + 1, skipped)
            if done % self.cfg.logging.interval_steps == 0 or done == total:
                row = self._log_row(done, lr, float(grad_norm), window)
                window = PairMetrics()
            if stop:  # every rank is here, after the same step: no collective is left half-done
                progress.close()
                self.checkpoints.wait()  # an async save in flight is finished and published
                raise Interrupted(stop)
            if t.eval_interval_steps and done % t.eval_interval_steps == 0 and done != total:
                with self.meter.paused():
                    self.evaluate(done)
            if self.checkpoints.due(done):
                with self.meter.paused():
                    self.checkpoints.save(done, state)
        progress.close()
        self.checkpoints.close()
        stopping_at("during the final evaluation and export")
        after = self.evaluate(total)
        if before and after and "eval/rewards/accuracies" in after:  # preference pairs (not kto's)
            log(
                "held-out preference accuracy (strict: ties, as at step 0, count as wrong): "
                f"before {before['eval/rewards/accuracies']:.3f} -> after {after['eval/rewards/accuracies']:.3f}"
            )
        export_final(self.model, self.tokenizer, self.cfg, self.world, self.run_dir)
        # rank 0's hub push and post-train command come after the process group is gone
        # (engine.post_train.finish): an evaluation may take hours, no peer waits in a collective
        self.metrics.close()
        return {"train": row, "eval_before": before, "eval_after": after}

    def _advance(self, done: int, skipped: bool) -> int:
        """Count optimizer step `done` (1-based) in the state; returns `done`. Too many skipped
        steps in a row stop the run."""
        state, t = self.state, self.cfg.training
        state.step, state.consumed_pairs = done, done * t.global_batch_size
        stopping_at(f"at step {done}", deferred=True)
        state.skipped_steps += skipped
        state.skipped_in_row = state.skipped_in_row + 1 if skipped else 0
        if skipped:
            log(f"step {done}: non-finite loss on some rank, update skipped")
        if state.skipped_in_row >= t.max_skipped_steps:
            raise UserError(
                f"training: {state.skipped_in_row} consecutive steps had a NaN/inf loss "
                f"(training.max_skipped_steps={t.max_skipped_steps}); stopping"
            )
        return done

    def _log_row(self, step: int, lr: float, grad_norm: float, window: PairMetrics) -> dict[str, Any]:
        """The training row of the logging window that ends at `step` (`ThroughputMeter`)."""
        means, throughput = self.meter.reduce(window)
        row = {
            "step": step,
            "epoch": step / self.sampler.steps_per_epoch,
            **means,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": self.state.skipped_steps,
            **throughput,
        }
        self.metrics.write(row)
        log(format_row(row))
        return row


def _fault_kill_at_step(step: int) -> None:
    """Testing hook: FSDPO_FAULT_KILL="N:R:MARKER" SIGKILLs rank R after step N, once (the
    marker file records that it happened, so a restarted job runs through)."""
    spec = os.environ.get("FSDPO_FAULT_KILL")
    if not spec:
        return
    at, rank, marker = spec.split(":", 2)
    me = dist.get_rank() if dist.is_initialized() else 0
    if int(at) == step and int(rank) == me and not os.path.exists(marker):
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_nan_step() -> int:
    """Testing hook: FSDPO_FAULT_NAN_STEP=N (with FSDPO_FAULT_NAN_RANK=r) poisons step N's loss."""
    step = os.environ.get("FSDPO_FAULT_NAN_STEP")
    if not step:
        return -1
    rank = int(os.environ.get("FSDPO_FAULT_NAN_RANK", "0"))
    return int(step) if rank == (dist.get_rank() if dist.is_initialized() else 0) else -1
