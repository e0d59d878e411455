"""Stopping and failing under torchrun, with real processes.

Ctrl-C (SIGINT to torchrun's process group, as a terminal sends it) stops every rank after the
same step with one line naming the checkpoint to resume from, and a rerun resumes there; a
SIGKILLed torchrun takes its workers along (their parent-death signal, a SIGTERM, stops them
the same way); a user error found by rank 1 alone reaches the user as its one line. The
in-process tests check the same paths in one rank, and the error file torchrun reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import torchrun_train
from engine.checkpoint import complete_checkpoints
from engine.errors import UserError
from engine.recipe import load_config
from tests.conftest import (
    REPO,
    base_tables,
    run_training,
    train_rows,
    training_command,
    training_env,
    write_recipe,
)
from tests.test_checkpoint import TIMING

pytestmark = pytest.mark.slow

STEPS = 1000  # every launched run is stopped long before its end
STOPPED = re.compile(
    r"fsdpo: interrupted \((SIGINT|SIGTERM)\) at step (\d+); rerun the same command to resume from step-(\d+)"
)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("stops")
    tables = base_tables(tiny_model_dir, small_data, tmp / "unused")
    tables["data"]["eval"] = []
    tables["training"].update(max_steps=STEPS, micro_batch_size=2)
    tables["checkpoint"] = {"interval_steps": 2, "keep_last": 2}
    tables["logging"] = {"interval_steps": 1}
    return write_recipe(tmp / "stops.toml", tables)


@dataclass
class Stopped:
    out: Path  # the run's output folder
    code: int  # torchrun's exit code
    stdout: str
    stderr: str
    rows: list[dict]  # its metrics rows when it ended
    checkpoints: list[str]  # the names in its checkpoints/ folder then
    complete: list[int]  # the steps of the complete checkpoints among them
    workers_gone_s: float = 0.0  # SIGKILLed torchrun: how long its workers outlived it


def _start(recipe: Path, out: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """torchrun with 2 ranks in a session of its own (its workers have theirs), output to files."""
    logs = out.parent / name
    logs.mkdir()
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            training_command(recipe, [f"job.output_dir={out}"], nproc=2),
            cwd=REPO, stdout=stdout, stderr=stderr, env=training_env(), start_new_session=True,
        )  # fmt: skip
    return proc, logs


def _wait_until(condition: Callable[[], object], what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + 150
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.05)


def _newest_checkpoint(out: Path) -> int:
    found = complete_checkpoints(out / "checkpoints")
    return found[-1][0] if found else 0


def _last_logged_step(out: Path) -> int:
    try:
        return train_rows(out)[-1]["step"]
    except (OSError, ValueError, IndexError):  # not there yet, or being rewritten
        return 0


def _finish(proc: subprocess.Popen, logs: Path, out: Path) -> Stopped:
    try:
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = (logs / "stdout").read_text(), (logs / "stderr").read_text()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    complete = [step for step, _ in complete_checkpoints(out / "checkpoints")]
    return Stopped(out, proc.returncode, stdout, stderr, train_rows(out), names, complete)


def _worker_pids(out: Path) -> list[int]:
    """The live torchrun_train.py processes of the run writing to `out` (not torchrun itself)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        words = [a.decode(errors="replace") for a in argv]
        if f"job.output_dir={out}" in words and "torch.distributed.run" not in words and state != "Z":
            pids.append(int(proc.name))
    return pids


def _assert_stopped_cleanly(run: Stopped, signame: str) -> tuple[int, int]:
    """The one line (step N, checkpoint M), no traceback from our code, only complete checkpoints."""
    lines = [line for line in run.stderr.splitlines() if line.startswith("fsdpo:")]
    assert len(lines) == 1, run.stderr[-4000:]
    match = STOPPED.fullmatch(lines[0])
    assert match and match.group(1) == signame, lines[0]
    step, resume = int(match.group(2)), int(match.group(3))
    assert f'File "{REPO}' not in run.stderr, run.stderr[-4000:]  # no traceback frame of ours
    assert run.complete[-1] == resume <= step < STEPS
    assert run.checkpoints == sorted(f"step-{n}" for n in run.complete)  # no .incomplete, none broken
    assert run.rows[-1]["step"] == step  # the step finished and was logged, no later one
    return step, resume


@pytest.fixture(scope="module")
def interrupted(recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Stopped:
    """A run that got Ctrl-C once its first checkpoint was published."""
    out = tmp_path_factory.mktemp("stops") / "run"
    proc, logs = _start(recipe, out, "first")
    _wait_until(lambda: _newest_checkpoint(out), "the first checkpoint", proc)
    os.killpg(proc.pid, signal.SIGINT)
    return _finish(proc, logs, out)


@pytest.fixture(scope="module")
def resumed_then_killed(recipe: Path, interrupted: Stopped) -> Stopped:
    """The same command again; SIGKILL to its torchrun once it has replayed the steps the first
    run did after its checkpoint, and saved a newer one."""
    first_step = interrupted.rows[-1]["step"]
    out = interrupted.out
    proc, logs = _start(recipe, out, "again")
    _wait_until(
        lambda: _newest_checkpoint(out) > first_step and _last_logged_step(out) > first_step,
        "a checkpoint newer than the first run's last step",
        proc,
    )
    assert len(_worker_pids(out)) == 2
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    _wait_until(lambda: not _worker_pids(out), "the workers to exit")
    gone = time.monotonic() - killed
    return dataclasses.replace(_finish(proc, logs, out), workers_gone_s=gone)


def test_ctrl_c_stops_every_rank_after_a_step_with_one_line(interrupted: Stopped) -> None:
    assert interrupted.code == 1  # torchrun's own code after a signal (its workers leave with 130)
    _assert_stopped_cleanly(interrupted, "SIGINT")
    # what torchrun prints itself: its SignalException traceback, one
    assert interrupted.stderr.count("Traceback") == 1
    assert "SignalException: Process" in interrupted.stderr


def test_rerun_after_ctrl_c_resumes_where_the_checkpoint_left_off(
    interrupted: Stopped, resumed_then_killed: Stopped
) -> None:
    step, resume = _assert_stopped_cleanly(interrupted, "SIGINT")
    out = interrupted.out
    assert f"resumed from {out / 'checkpoints' / f'step-{resume}'}" in resumed_then_killed.stdout
    after = resumed_then_killed.rows
    assert [r["step"] for r in after] == list(range(1, after[-1]["step"] + 1))  # each step once
    # steps resume+1..step ran before the stop too: the resumed run repeats them bitwise
    # (test_checkpoint compares whole resumed runs with uninterrupted ones)
    assert resume < step  # the stop is decided in a step after the checkpoint's
    for row in after[resume:step]:
        assert {k: row[k] for k in row.keys() - TIMING} == {
            k: interrupted.rows[row["step"] - 1][k] for k in row.keys() - TIMING
        }


def test_a_killed_torchrun_takes_its_workers_along(resumed_then_killed: Stopped) -> None:
    assert resumed_then_killed.code == -signal.SIGKILL
    assert resumed_then_killed.workers_gone_s < 10
    # the kernel's SIGTERM (parent death) stopped them as a SIGTERM from torchrun would
    _assert_stopped_cleanly(resumed_then_killed, "SIGTERM")
    assert "Traceback" not in resumed_then_killed.stderr  # torchrun died silently, the workers too


def test_a_user_error_on_rank_1_alone_reaches_the_user(recipe: Path, tmp_path: Path) -> None:
    proc = run_training(
        recipe,
        [f"job.output_dir={tmp_path / 'run'}"],
        nproc=2,
        timeout=150,
        env={"FSDPO_FAULT_USER_ERROR": "1"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fsdpo:")]
    # rank 0, stopped by torchrun with SIGTERM, stays silent: the peer's error is the cause
    assert lines == ["fsdpo: error: [rank 1] FSDPO_FAULT_USER_ERROR: an error injected on rank 1"], (
        proc.stderr
    )
    assert proc.returncode == 1  # torchrun's code; the worker's, 2, is in its summary
    assert re.search(r"rank +: 1 \(local_rank: 1\)\n +exitcode +: 2 ", proc.stderr), proc.stderr
    assert "traceback : fsdpo: error: [rank 1] FSDPO_FAULT_USER_ERROR" in proc.stderr  # the error file
    assert f'File "{REPO}' not in proc.stderr


# -- in this process: one rank -----------------------------------------------------------------


def test_report_tags_each_line_with_the_rank_and_fills_torchruns_error_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = tmp_path / "attempt_0" / "1" / "error.json"
    error_file.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    torchrun_train._report(UserError("data.train[0]: first problem\ndata.eval[0]: second problem"))
    expected = [
        "fsdpo: error: [rank 1] data.train[0]: first problem",
        "fsdpo: error: [rank 1] data.eval[0]: second problem",
    ]
    assert capsys.readouterr().err.splitlines() == expected
    # torchrun's own reader of the file, and its summary
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError("torchrun_train.py", {1: failure}).format_msg()
    assert f"traceback : {expected[0]}\n  {expected[1]}" in summary
    assert abs(failure.timestamp - time.time()) < 60
    # a peer of this rank sees that it failed
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "attempt_0" / "0" / "error.json"))
    assert torchrun_train._peer_failed()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert not torchrun_train._peer_failed()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    torchrun_train._report(UserError("recipe.toml: a problem"))
    assert capsys.readouterr().err == "fsdpo: error: recipe.toml: a problem\n"  # one process: no tag


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # the handler runs here, in the main thread (and raises outside the loop)


def _release_groups_left_by_a_stop() -> None:
    """A stop skips the teardown (peers may have left), and the process's exit releases what the
    run held: here, where later tests share the process, its process groups other than the
    default one (the async save's gloo group; a process forked later hangs destroying it)."""
    import torch.distributed as dist

    default = dist.distributed_c10d._get_default_group()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)


def _run_main(
    recipe: Path, out: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *overrides: str
) -> tuple:
    import engine.distributed

    monkeypatch.setattr(engine.distributed, "shutdown", lambda: None)  # later tests need the group
    monkeypatch.chdir(REPO)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    code = torchrun_train.main([str(recipe), f"job.output_dir={out}", *overrides])
    _release_groups_left_by_a_stop()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fsdpo:")]
    return code, lines


def test_a_stop_in_the_training_loop_waits_for_the_step_end(
    recipe: Path, world, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.trainer

    monkeypatch.setattr(
        engine.trainer, "_fault_kill_at_step", lambda step: step == 3 and _signal_self(signal.SIGINT)
    )
    out = tmp_path / "run"
    code, lines = _run_main(recipe, out, capsys, monkeypatch, "checkpoint.async_save=true")
    # the signal came after step 3's all-reduce: step 4 runs, its checkpoint is not started, and
    # step 2's asynchronous save, still in flight, is finished and published
    assert (code, lines) == (
        130,
        ["fsdpo: interrupted (SIGINT) at step 4; rerun the same command to resume from step-2"],
    )
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert (out / "checkpoints" / "step-2" / "COMPLETE").is_file()


def test_a_stop_outside_the_training_loop_ends_the_run_where_it_is(
    recipe: Path, world, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.reference

    reference = engine.reference.compute_reference_logps
    monkeypatch.setattr(
        engine.reference,
        "compute_reference_logps",
        lambda *a, **k: _signal_self(signal.SIGTERM) or reference(*a, **k),
    )
    code, lines = _run_main(recipe, tmp_path / "run", capsys, monkeypatch)
    assert (code, lines) == (
        143,
        [
            "fsdpo: interrupted (SIGTERM) during start-up; nothing was saved; rerun the same command to start over"
        ],
    )
    assert not any((tmp_path / "run" / name).exists() for name in ("metrics.jsonl", "checkpoints", "final"))


def test_the_resume_hint_names_what_a_rerun_does(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(recipe, [f"job.output_dir={out}"])
    assert torchrun_train._resume_hint(cfg) == "nothing was saved; rerun the same command to start over"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert (
        torchrun_train._resume_hint(cfg) == "no checkpoint yet; rerun with job.overwrite=true to start over"
    )
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "COMPLETE").write_text("")
    (out / "checkpoints" / ".step-4.incomplete").mkdir()
    assert torchrun_train._resume_hint(cfg) == "rerun the same command to resume from step-2"
    never = load_config(recipe, [f"job.output_dir={out}", "checkpoint.resume=never"])
    assert torchrun_train._resume_hint(never) == "rerun with checkpoint.resume=auto to resume from step-2"
