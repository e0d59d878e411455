"""DCP checkpoints: when to save, sharded save, atomic publish, retention, resume on any world size.

A checkpoint is `output_dir/checkpoints/step-N/`:
- the DCP files of the model and optimizer state (sharded: every rank writes its own shards;
  DCP reshards on load, so a checkpoint saved on 8 ranks resumes on 4 or 1), and TR-DPO's live
  reference model (`reference.sync_steps`);
- `trainer_state.json`: step, consumed pairs (a global count, independent of world size), the
  global batch size, counters, the scheduler state, the batch-coupled losses' running state
  (`engine.losses.LossState`: BCO's reward mean);
- `rng/rank-R.pt`: each rank's RNG states (restored when the world size is unchanged);
- `recipe.toml`: the resolved recipe, so `python -m engine.export` needs nothing else;
- `COMPLETE`: written last, after every rank has finished writing.

`CheckpointManager` owns what a checkpoint holds and when one is due (`checkpoint.interval_steps`,
`checkpoint.interval_epochs`): the trainer hands it the model, optimizer and scheduler once and
asks `due(step)` after each step.

Saves go to `.step-N.incomplete/` and are renamed to `step-N/` only when complete, so a crash
mid-save never leaves a half checkpoint that looks complete. Retention deletes only older
`step-N` folders this engine published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from engine.config import CheckpointConfig
from engine.distributed import World, from_main, log
from engine.errors import UserError, first_line
from engine.losses import LossState
from engine.run_dir import RunDir

# Frozen parameters (LoRA's base weights) are not saved: they come from model.path on resume.
STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)
REFERENCE_OPTIONS = StateDictOptions(strict=False)  # a live reference: frozen, all of it saved
STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"


@dataclass
class TrainerState:
    """Everything besides model and optimizer that a resumed run needs."""

    step: int = 0
    consumed_pairs: int = 0
    global_batch_size: int = 0
    world_size: int = 0
    skipped_steps: int = 0
    skipped_in_row: int = 0
    scheduler: dict[str, Any] | None = None
    total_steps: int = 0  # the steps the schedule was planned for (0: a checkpoint from before it was saved)
    loss_state: dict[str, float | int] | None = None  # batch-coupled losses' state (`losses.LossState`)


def read_trainer_state(path: Path) -> TrainerState:
    """The `trainer_state.json` of checkpoint `path`; a UserError naming the file if it is
    missing or corrupt (a checkpoint edited or truncated by hand, a disk error)."""
    file = path / "trainer_state.json"
    try:
        state = TrainerState(**json.loads(file.read_text()))
    except FileNotFoundError:
        raise UserError(f"checkpoint.resume: {file} is missing (not a complete fsdpo checkpoint)") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"checkpoint.resume: {file} is corrupt ({first_line(e)}); resume from another "
            "checkpoint (checkpoint.resume=PATH) or start over in another job.output_dir"
        ) from None
    if not (isinstance(state.step, int) and state.step >= 0 and isinstance(state.global_batch_size, int)):
        raise UserError(f"checkpoint.resume: {file} is corrupt (step={state.step!r})")
    return state


def check_checkpoint(path: Path) -> None:
    """Read what a resume reads first (trainer state, DCP metadata), so that a corrupt checkpoint
    is an error before anything is built or written, not after the reference pass."""
    read_trainer_state(path)
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or foreign .metadata: unpickling raises anything
        raise UserError(
            f"checkpoint.resume: cannot load {path} (its DCP metadata: {_failure(e)[1]})"
        ) from None


def _failure(error: BaseException) -> tuple[BaseException, str]:
    """The first underlying exception of a DCP failure (DCP wraps each rank's in a
    CheckpointException, a BaseException) and its one-line description."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, OSError) and error.strerror:
        return error, error.strerror
    return error, first_line(error)


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """Published, complete checkpoints, oldest first."""
    found = []
    if checkpoint_dir.is_dir():
        for child in checkpoint_dir.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume_path(cfg: CheckpointConfig, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, per `checkpoint.resume`, or None to start fresh (checked
    as a resume reads it: `check_checkpoint`)."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        if found:
            check_checkpoint(found[-1][1])
        return found[-1][1] if found else None
    path = Path(cfg.resume).expanduser()
    if not (path / COMPLETE).is_file():
        what = "not found" if not path.exists() else "not a complete fsdpo checkpoint"
        raise UserError(f"checkpoint.resume: {path} is {what}")
    check_checkpoint(path)
    return path


class CheckpointManager:
    """Decides when to save, and saves, publishes, prunes and resumes the checkpoints of one run:
    the model, optimizer and scheduler it was given (and a TR-DPO live `reference` model, whose
    weights follow the policy's), the trainer state and RNG states handed to `save`. Collective
    methods are marked.

    `recipe` (the resolved recipe TOML) is stored in every checkpoint, so `python -m engine.export`
    can rebuild the model from the checkpoint alone.
    """

    def __init__(
        self,
        run_dir: RunDir,
        cfg: CheckpointConfig,
        world: World,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        steps_per_epoch: int,
        recipe: str,
        loss_state: LossState | None = None,
        reference: nn.Module | None = None,
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, world.rank, world.world_size
        self.loss_state, self.reference = loss_state, reference
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.steps_per_epoch, self.recipe = steps_per_epoch, recipe
        self.run_dir = run_dir  # saving, publishing and pruning touch only fsdpo's own files
        self.dir = run_dir.path / "checkpoints"
        self._pending: tuple[Any, Path, Path] | None = None  # (future, staging, final) of an async save
        self._async_group = None

    def due(self, step: int) -> bool:
        """Whether a checkpoint is saved once `step` optimizer steps are done: every
        `checkpoint.interval_steps` steps, and at the end of every `checkpoint.interval_epochs`-th
        epoch (a step that is both saves once)."""
        every, epochs, per_epoch = self.cfg.interval_steps, self.cfg.interval_epochs, self.steps_per_epoch
        at_interval = bool(every) and step % every == 0
        at_epoch = bool(epochs) and step % per_epoch == 0 and (step // per_epoch) % epochs == 0
        return step > 0 and (at_interval or at_epoch)

    # -- resume ---------------------------------------------------------------------------------

    def resume(self, path: Path, state: TrainerState) -> TrainerState:
        """Collective: load the model, optimizer, scheduler and RNG states of checkpoint `path`
        (saved on any world size) into this run, whose fresh `state` holds its global batch size,
        world size and schedule length. Returns the state to continue from."""
        saved = read_trainer_state(path)
        gbs = state.global_batch_size
        if saved.global_batch_size != gbs:
            raise UserError(
                f"training.global_batch_size: the checkpoint {path} was trained with "
                f"{saved.global_batch_size} pairs per step, this run asks for {gbs}"
            )
        to_load = self._state()
        try:
            dcp.load(to_load, checkpoint_id=str(path))
        except (OSError, CheckpointException) as e:  # unreadable files, or not this model's state
            raise UserError(f"checkpoint.resume: cannot load {path} ({_failure(e)[1]})") from None
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=to_load["model"],
            optim_state_dict=to_load["optim"],
            options=STATE_OPTIONS,
        )
        if self.reference is not None:
            set_model_state_dict(self.reference, to_load["reference"], options=REFERENCE_OPTIONS)
        rng_file = path / "rng" / f"rank-{self.rank}.pt"
        if saved.world_size == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            log(f"resume: saved on {saved.world_size} ranks, now {self.world_size}: RNG states not restored")
        log(f"resumed from {path} at step {saved.step} ({saved.consumed_pairs} pairs consumed)")
        self._resume_schedule(path, saved, state.total_steps)
        if self.loss_state is not None and saved.loss_state is not None:
            self.loss_state.load_state_dict(saved.loss_state)
        return dataclasses.replace(saved, world_size=self.world_size, total_steps=state.total_steps)

    def _resume_schedule(self, path: Path, saved: TrainerState, total_steps: int) -> None:
        """The saved scheduler state; a schedule planned for another length is followed from the
        next step on (a warning says what changes)."""
        self.scheduler.load_state_dict(saved.scheduler)
        if saved.total_steps and saved.total_steps != total_steps:
            before = self.scheduler.get_last_lr()[0]
            self.scheduler.last_epoch -= 1
            self.scheduler.step()  # the new schedule's learning rate, from the next step on
            log(
                f"warning: resuming {path}: its schedule was planned for {saved.total_steps} steps, this run "
                f"has {total_steps} (training.max_steps, epochs or the data changed); the learning rate "
                f"follows the new schedule from step {saved.step + 1}: {self.scheduler.get_last_lr()[0]:.4g} "
                f"instead of {before:.4g}"
            )

    # -- save -----------------------------------------------------------------------------------

    def save(self, step: int, state: TrainerState) -> None:
        """Collective: write checkpoint `step-N` of the model, optimizer and scheduler, `state`
        and the RNG states (waits for a previous async save first)."""
        self.wait()
        final = self.dir / f"step-{step}"
        if final.exists():
            return  # kept: a run resumed from an earlier checkpoint of this folder reaches it again
        staging = self.dir / f".step-{step}.incomplete"
        error: OSError | None = None
        if self.rank == 0:
            try:
                self.run_dir.remove(staging)  # a previous crash's leftovers, if the manifest has them
                self.run_dir.claim(staging)
                (staging / "rng").mkdir(parents=True)
                loss_state = self.loss_state.state_dict() if self.loss_state is not None else None
                saved = dataclasses.replace(
                    state, scheduler=self.scheduler.state_dict(), loss_state=loss_state
                )
                (staging / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(saved)))
                (staging / "recipe.toml").write_text(self.recipe)
            except OSError as e:
                error = e
        error = from_main(error)  # every rank learns whether the folder is there to write into
        if error is not None:
            self._save_failed(error, staging)
        to_save = self._state()
        try:
            # the collective write first: a full disk then fails on every rank alike
            if self.cfg.async_save:
                if self._async_group is None:  # on the default group it deadlocks against FSDP
                    self._async_group = dist.new_group(backend="gloo")
                future = dcp.async_save(to_save, checkpoint_id=str(staging), process_group=self._async_group)
                self._pending = (future, staging, final)
            else:
                dcp.save(to_save, checkpoint_id=str(staging))
            torch.save(_rng_state(), staging / "rng" / f"rank-{self.rank}.pt")
        except (OSError, CheckpointException) as e:
            self._save_failed(e, staging)
        if not self.cfg.async_save:
            self._publish(staging, final)

    def _state(self) -> dict[str, Any]:
        """The DCP state dicts a checkpoint holds: model, optimizer (and the live reference)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=STATE_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
        if self.reference is not None:
            state["reference"] = get_model_state_dict(self.reference, options=REFERENCE_OPTIONS)
        return state

    def wait(self) -> None:
        """Collective: finish an in-flight async save and publish it."""
        if self._pending is None:
            return
        future, staging, final = self._pending
        self._pending = None
        try:
            future.result()
        except (OSError, CheckpointException) as e:
            self._save_failed(e, staging)
        self._publish(staging, final)

    def _save_failed(self, error: BaseException, staging: Path) -> None:
        """A full disk or a lost mount is a UserError; the half-written staging folder is removed
        (ours by name, never published) to give the space back. Anything else is a bug."""
        cause, description = _failure(error)
        if not isinstance(cause, OSError):
            raise error
        if self.rank == 0:
            with contextlib.suppress(OSError):
                self.run_dir.remove(staging)
        raise UserError(
            f"checkpoint: cannot write {staging.parent / staging.name.removeprefix('.').removesuffix('.incomplete')} "
            f"({description}); earlier checkpoints are untouched"
        ) from None

    def _publish(self, staging: Path, final: Path) -> None:
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            _fault_kill_in_save(final)
            (staging / COMPLETE).write_text("")
            self.run_dir.publish(staging, final)
            log(f"checkpoint saved: {final}")
            self._prune()
        if dist.is_initialized():
            dist.barrier()

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for _, path in complete_checkpoints(self.dir)[: -self.cfg.keep_last]:
            self.run_dir.remove(path)  # a checkpoint of an older fsdpo (not in the manifest) stays

    def close(self) -> None:
        """Collective: wait for pending saves and release the async process group."""
        self.wait()
        if self._async_group is not None:
            dist.barrier()
            dist.destroy_process_group(self._async_group)
            self._async_group = None


def _fault_kill_in_save(final: Path) -> None:
    """Testing hook: FSDPO_FAULT_KILL_IN_SAVE=N dies after the shards of step-N are written but
    before the checkpoint is published, as a crash mid-save would."""
    if os.environ.get("FSDPO_FAULT_KILL_IN_SAVE") == final.name.removeprefix("step-"):
        os._exit(9)
