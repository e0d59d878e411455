"""The training loop: build everything from the recipe, then train, evaluate and export.

Why the loss is divided by the global pair count: every micro-batch contributes
sum(per-pair losses) / global_batch_size and FSDP *sums* gradients across ranks (its averaging
is switched off in parallel.py), so the optimizer sees the mean over the global batch however
it is split into ranks x micro-batches x accumulation steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine import losses
from engine.attention import kernel_plan
from engine.checkpoint import CheckpointManager, TrainerState
from engine.config import Config, DataSource, to_toml
from engine.data import (
    GlobalBatchSampler,
    PreferenceDataset,
    build_dataset,
    collate,
    padding_fraction,
    pair_token_counts,
    resolve_chat_template,
    shard_for_inference,
    split_eval,
)
from engine.distributed import Interrupted, World, log, stopping_at
from engine.errors import UserError
from engine.export import export_hf
from engine.metrics import (
    MetricsLogger,
    PairMetrics,
    Work,
    device_peak,
    format_rate,
    format_row,
    forward_work,
    matmul_peak_once,
    mfu,
    model_flops,
    model_shape,
    peak_memory_gib,
)
from engine.model import adapter_description, build_tokenizer
from engine.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps
from engine.parallel import check_compiler, compute_dtype
from engine.progress import Progress
from engine.reference import ReferenceLogps, compute_reference_logps, reference_layout
from engine.reference_cache import load_reference_cache, reference_cache_key, save_reference_cache
from engine.run_dir import RunDir, check_output_dir, prepare_output_dir
from engine.step import TrainStep, build_model


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


class Trainer:
    """Builds every component from its own recipe table, then `train()` runs the loop.

    With `reference_only`, it stops after the reference log-prob cache is built (nothing else is
    written to the output folder), for precomputing the cache on other hardware.
    """

    def __init__(self, cfg: Config, world: World, reference_only: bool = False) -> None:
        self.cfg, self.world = cfg, world
        self.output_dir = Path(cfg.job.output_dir)
        self.run_dir = RunDir(self.output_dir, world.is_main)  # the files fsdpo wrote there
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, world.rank, world.world_size)
        resume_from = None if reference_only else self.checkpoints.resume_path()
        self.resuming = resume_from is not None
        if not reference_only:  # look now; change the folder only once every input has loaded
            check_output_dir(self.output_dir, cfg.job.overwrite, self.resuming)
        check_compiler(cfg.parallel, world.device.type)  # before hours of loading, not after
        torch.manual_seed(cfg.job.seed)

        # data
        self.tokenizer = build_tokenizer(cfg.model)
        template = resolve_chat_template(cfg.data.chat_template)
        if template:  # trained with it, so exported with it
            self.tokenizer.chat_template = template
        self.pad_id = self.tokenizer.pad_token_id
        self.train_data = build_dataset(cfg.data.train, self.tokenizer, cfg.data, cfg.job.seed)
        self.eval_data = None
        if cfg.data.eval:
            self.eval_data = build_dataset(cfg.data.eval, self.tokenizer, cfg.data, cfg.job.seed)
        elif cfg.data.eval_fraction > 0:
            self.train_data, self.eval_data = split_eval(
                self.train_data, cfg.data.eval_fraction, cfg.job.seed
            )
        log(self.train_data.summary())
        t = cfg.training
        self.sampler = GlobalBatchSampler(
            len(self.train_data), t.global_batch_size, t.micro_batch_size, world.rank, world.world_size, cfg.job.seed,
            lengths=self.train_data.sequence_lengths() if cfg.data.group_by_length else None,
            group_by_length=cfg.data.group_by_length,
            micro_batch_tokens=t.micro_batch_tokens,
            pair_tokens=pair_token_counts(self.train_data.lengths(), t.forward_mode) if t.micro_batch_tokens else None,
        )  # fmt: skip
        self.total_steps = t.max_steps if t.max_steps > 0 else t.epochs * self.sampler.steps_per_epoch
        for line in startup_warnings(cfg, self.total_steps, self.sampler):
            log(line)

        # model, sharded
        # pretrained safetensors: parameters start on the meta device and every rank reads only
        # its own shards after sharding (no rank ever holds the whole model)
        self.model, mesh = build_model(cfg, world)
        causal_lm = self.model.causal_lm
        self.num_params = sum(p.numel() for p in causal_lm.parameters())  # global, of the shards
        self.trainable_params = sum(p.numel() for p in causal_lm.parameters() if p.requires_grad)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.scheduler)
        self.dtype = compute_dtype(cfg.parallel, world.device)
        if t.forward_mode in ("packed", "prefix_shared"):  # per layer kind; a forced one missing stops here
            self.attention = kernel_plan(causal_lm.config, world.device, self.dtype, t.attention_kernel)
        else:
            self.attention = {"all layers": f"transformers {cfg.model.attn_implementation}"}
        log(
            f"attention ({t.forward_mode}): " + ", ".join(f"{kind} {k}" for kind, k in self.attention.items())
        )

        # reference log-probs, from the initial weights (so before any checkpoint is loaded)
        self.reference_forwards = 0
        self.reference_batch = cfg.reference.batch_size or 4 * t.micro_batch_size
        self.reference_dir = Path(cfg.reference.cache_dir or self.output_dir / "reference")
        if self.reference_dir.exists() and not self.reference_dir.is_dir():  # before hours of forwards
            raise UserError(f"reference.cache_dir: {self.reference_dir} is not a folder")
        self.train_reference = self._reference(self.train_data, "train", cfg.data.train)
        self.eval_reference = self._reference(self.eval_data, "eval", cfg.data.eval)
        if reference_only:
            return
        self.step = TrainStep(
            self.model, self.optimizer, self.scheduler, cfg, world.device, self.pad_id, self.train_reference
        )

        self.state = TrainerState(
            global_batch_size=t.global_batch_size, world_size=world.world_size, total_steps=self.total_steps
        )
        if resume_from is not None:
            self._resume(resume_from)
        prepare_output_dir(self.run_dir, cfg.job.overwrite, self.state.step if self.resuming else None)
        if world.is_main:
            (self.output_dir / "recipe.toml").write_text(to_toml(cfg))
            self._write_data_stats()
            self.run_dir.record(self.output_dir / "recipe.toml", self.output_dir / "data_stats.json")
        self.peak = device_peak(world.device, self.dtype, matmul_peak_once(world.device, self.dtype))
        self.flop_shape = model_shape(self.model.causal_lm)  # for `mfu` (engine.metrics)
        self.pair_lengths = self.train_data.lengths()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, world.is_main, dataclasses.asdict(cfg))
        if t.micro_batch_tokens:
            batching = f"micro-batches of up to {t.micro_batch_tokens} tokens (as many per step as the fullest rank needs)"
        else:
            batching = f"{self.sampler.accumulation_steps} accumulation steps of {t.micro_batch_size} pairs"
        log(
            f"model: {self.num_params / 1e6:.2f}M parameters ({self.trainable_params / 1e6:.2f}M trained), "
            f"{world.world_size} ranks, sharding {cfg.parallel.sharding} over mesh {tuple(mesh.shape)}, "
            f"{batching}, {self.total_steps} steps, compute {self.dtype}, "
            f"MFU peak {format_rate(self.peak.flops)} per rank ({self.peak.why})"
        )

    def _adapters_disabled(self) -> contextlib.AbstractContextManager:
        if self.cfg.lora.enabled:
            return self.model.causal_lm.disable_adapter()
        return contextlib.nullcontext()

    def _write_data_stats(self) -> None:
        """output_dir/data_stats.json: per-source filter counts, token-length percentiles, and the
        padding fraction each padded forward mode would pay at this batch size."""
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
            for mode in ("concatenated", "separate")
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
        (self.output_dir / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    def _resume(self, path: Path) -> None:
        saved = self.checkpoints.load(path, self.model, self.optimizer)
        gbs = self.cfg.training.global_batch_size
        if saved.global_batch_size != gbs:
            raise UserError(
                f"training.global_batch_size: the checkpoint {path} was trained with "
                f"{saved.global_batch_size} pairs per step, this run asks for {gbs}"
            )
        self.scheduler.load_state_dict(saved.scheduler)
        if saved.total_steps and saved.total_steps != self.total_steps:
            before = self.scheduler.get_last_lr()[0]
            self.scheduler.last_epoch -= 1
            self.scheduler.step()  # the new schedule's learning rate, from the next step on
            log(
                f"warning: resuming {path}: its schedule was planned for {saved.total_steps} steps, this run "
                f"has {self.total_steps} (training.max_steps, epochs or the data changed); the learning rate "
                f"follows the new schedule from step {saved.step + 1}: {self.scheduler.get_last_lr()[0]:.4g} "
                f"instead of {before:.4g}"
            )
        self.state = dataclasses.replace(
            saved, world_size=self.world.world_size, total_steps=self.total_steps
        )

    def _reference(
        self, dataset: PreferenceDataset | None, name: str, sources: list[DataSource]
    ) -> ReferenceLogps | None:
        """Load the cached reference log-probs of `dataset`, or compute and cache them."""
        if dataset is None or not losses.needs_reference(self.cfg.loss):
            return None
        key = reference_cache_key(
            self.cfg.model, self.cfg.job.seed, self.tokenizer, dataset, self.cfg.data,
            adapter=adapter_description(self.cfg.lora), sources=sources,
            extra={"compute_dtype": str(self.dtype)}, cache_dir=self.reference_dir,
        )  # fmt: skip
        cached = load_reference_cache(self.reference_dir, key, dataset)
        if cached is not None:
            log(f"reference log-probs ({name}): loaded {self.reference_dir / key.file_name}")
            return cached.to(self.world.device)
        self.reference_forwards += 1
        if self.resuming:
            log(
                f"reference log-probs ({name}): no cache on resume; rebuilding from the initial weights of model.path"
            )
        with self._adapters_disabled():  # the reference is the base model
            reference = compute_reference_logps(
                self.model, dataset, self.pad_id, self.world.device, self.reference_batch,
                self.world.rank, self.world.world_size, name, reference_layout(self.cfg.training.forward_mode),
            )  # fmt: skip
        if self.world.is_main:
            path = save_reference_cache(self.reference_dir, key, dataset, reference)
            log(f"reference log-probs ({name}): cached in {path}")
        if dist.is_initialized():
            dist.barrier()
        return reference.to(self.world.device)

    # ------------------------------------------------------------------------------------------

    def train_step(self, step: int, window: PairMetrics) -> tuple[float, torch.Tensor, bool, int]:
        """One optimizer step over this rank's micro-batches (`engine.step.TrainStep`). Returns
        (lr, grad norm: a 0-d tensor, read it when logging; skipped, stop): `stop` is the stop
        signal some rank received (0: none), the same on every rank."""
        batches = [collate(self.train_data, indices) for indices in self.sampler.micro_batches(step)]
        result = self.step(batches, window, poison=_fault_nan_step() == step + 1)
        if self.step.state_bytes is not None and not hasattr(self, "state_bytes"):  # first update
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
        shards = shard_for_inference(
            len(self.eval_data), self.reference_batch, self.world.rank, self.world.world_size
        )
        progress = Progress(len(shards), f"eval at step {step}", "batch", enabled=self.world.is_main)
        for indices, valid in shards:
            micro = self.step.prepare(collate(self.eval_data, indices, valid))
            logps, out, pair_losses = self.step.pair_losses(micro, self.eval_reference)
            window.add(pair_losses, out, logps, micro.valid)
            progress.update()
        progress.close()
        self.model.train()
        reduced = window.reduce(self.world.device)
        row = {"step": step, **{f"eval/{k}": v for k, v in reduced.items() if k != "pairs"}}
        self.metrics.write(row)
        log(format_row(row))
        return row

    def train(self) -> dict[str, Any]:
        t, lg, ck = self.cfg.training, self.cfg.logging, self.cfg.checkpoint
        state = self.state
        self.model.train()
        stopping_at("during the evaluation at step 0")
        before = self.evaluate(0) if state.step == 0 else None
        window, window_start = PairMetrics(), state.step
        last_time = time.perf_counter()  # moved on by the time evaluation and checkpoints take
        row: dict[str, Any] = {}
        progress = Progress(self.total_steps, "training", "step", enabled=self.world.is_main)
        progress.update(state.step)
        stopping_at(f"at step {state.step}", deferred=True)  # a stop signal waits for the step's end
        for step in range(state.step, self.total_steps):
            lr, grad_norm, skipped, stop = self.train_step(step, window)
            progress.update(
                1, loss=f"{row.get('loss', float('nan')):.4f}", acc=f"{row.get('rewards/accuracies', 0):.3f}"
            )
            _fault_kill_at_step(step + 1)
            state.step, state.consumed_pairs = step + 1, (step + 1) * t.global_batch_size
            stopping_at(f"at step {state.step}", deferred=True)
            state.skipped_steps += skipped
            state.skipped_in_row = state.skipped_in_row + 1 if skipped else 0
            if skipped:
                log(f"step {state.step}: non-finite loss on some rank, update skipped")
            if state.skipped_in_row >= t.max_skipped_steps:
                raise UserError(
                    f"training: {state.skipped_in_row} consecutive steps had a NaN/inf loss "
                    f"(training.max_skipped_steps={t.max_skipped_steps}); stopping"
                )
            done = state.step
            if done % lg.interval_steps == 0 or done == self.total_steps:
                elapsed = time.perf_counter() - last_time
                steps = range(window_start, done)
                row = self._log_row(done, lr, float(grad_norm), state.skipped_steps, window, steps, elapsed)
                window, window_start = PairMetrics(), done
                last_time = time.perf_counter()
            if stop:  # every rank is here, after the same step: no collective is left half-done
                progress.close()
                self.checkpoints.wait()  # an async save in flight is finished and published
                raise Interrupted(stop)
            if t.eval_interval_steps and done % t.eval_interval_steps == 0 and done != self.total_steps:
                paused = time.perf_counter()
                self.evaluate(done)
                last_time += time.perf_counter() - paused
            epoch_end = done % self.sampler.steps_per_epoch == 0
            if (ck.interval_steps and done % ck.interval_steps == 0) or (
                ck.interval_epochs
                and epoch_end
                and (done // self.sampler.steps_per_epoch) % ck.interval_epochs == 0
            ):
                state.scheduler = self.scheduler.state_dict()
                paused = time.perf_counter()
                self.checkpoints.save(done, self.model, self.optimizer, state, to_toml(self.cfg))
                last_time += time.perf_counter() - paused
        progress.close()
        self.checkpoints.close()
        stopping_at("during the final evaluation and export")
        after = self.evaluate(self.total_steps)
        if before and after:
            log(
                "held-out preference accuracy (strict: ties, as at step 0, count as wrong): "
                f"before {before['eval/rewards/accuracies']:.3f} -> after {after['eval/rewards/accuracies']:.3f}"
            )
        if self.cfg.export.enabled:
            export_hf(
                self.model,
                self.tokenizer,
                self.cfg.model,
                self.output_dir / "final",
                self.cfg.export,
                self.cfg.lora,
                self.world.is_main,
                self.run_dir,
            )
            log(f"exported {self.output_dir / 'final'}")
        # rank 0's hub push and post-train command come after the process group is gone
        # (engine.post_train.finish): an evaluation may take hours, no peer waits in a collective
        self.metrics.close()
        return {"train": row, "eval_before": before, "eval_after": after}

    def _log_row(
        self,
        step: int,
        lr: float,
        grad_norm: float,
        skipped: int,
        window: PairMetrics,
        steps: range,
        elapsed: float,
    ) -> dict[str, Any]:
        """The training row of the window of optimizer `steps` (indices) that took `elapsed`
        seconds, evaluation and checkpoints left out. `tokens_per_s`: real pair tokens (prompt
        twice, chosen, rejected: TRL's count, whatever the forward mode computes);
        `positions_per_s`: positions the model computed (padding included, a shared prompt
        once); `mfu`: `engine.metrics.model_flops` of those steps over the peak of every rank."""
        work = Work()
        for s in steps:  # this rank's micro-batches, as train_step ran them
            for indices in self.sampler.micro_batches(s):
                work += forward_work(self.cfg.training.forward_mode, self.pair_lengths[indices])
        totals = {
            "tokens": float(window.tokens),
            "positions": float(work.positions),
            "flops": model_flops(self.flop_shape, work),
        }
        reduced = window.reduce(self.world.device, totals)
        tokens, positions, flops = (reduced.pop(k) for k in totals)
        reduced.pop("pairs")
        seconds = max(elapsed, 1e-9)
        row = {
            "step": step,
            "epoch": step / self.sampler.steps_per_epoch,
            **reduced,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped_steps": skipped,
            "tokens_per_s": tokens / seconds,
            "positions_per_s": positions / seconds,
            "mfu": mfu(flops, seconds, self.peak.flops, self.world.world_size),
            "peak_mem_gib": peak_memory_gib(self.world.device),
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
