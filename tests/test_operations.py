"""Operating fsdpo: wandb (offline), progress on a terminal, multi-node rendezvous, hub push,
post-training command."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import struct
import subprocess
import sys
import termios
import time
import typing
from pathlib import Path

import pytest
import torch

from engine.post_train import finish
from engine.recipe import load_config
from engine.trainer import Trainer
from tests.conftest import (
    REPO,
    base_tables,
    free_port,
    load_final_weights,
    main_in_process,
    read_metrics,
    run_training,
    train_rows,
    training_env,
    write_recipe,
)


def _read_wandb_records(path: Path) -> list:
    """Records of a .wandb run file (a leveldb-style log of protobuf `Record`s, 32 KiB blocks).

    wandb-core writes the file in its own process, so a read may catch a record half written: the
    records read stop before it, and the caller reads again until the run's `exit` record is there.
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break  # the tail is still being written
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except DecodeError:
                break  # a record whose bytes are not all on disk yet
            records.append(record)
    return records


def test_wandb_offline_logs_every_row_and_resumes_the_same_run(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: auto mode must go offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    overrides = [
        "logging.wandb=true",
        "logging.project=fsdpo-test",
        "checkpoint.interval_steps=2",
        "export.enabled=false",
    ]
    Trainer(load_config(recipe, overrides), world).train()
    run_id = (out / "wandb_run_id").read_text()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and run_id in files[0].name
    # wandb-core writes the run file in its own process; give it a moment to flush after finish()
    deadline = time.time() + 30
    while True:
        records = _read_wandb_records(files[0])
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.time() > deadline:
            break
        time.sleep(0.5)
    assert "exit" in kinds, f"the run file never got its exit record: {kinds}"
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = {h["_step"]: h for h in history}
    for row in read_metrics(out):
        for key, value in row.items():
            if key != "step":
                assert math.isclose(logged[row["step"]][key], value, rel_tol=1e-9), key
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "fsdpo-test" and run.run_id == run_id
    config_keys = {item.key for item in run.config.update}
    assert {"optimizer", "loss", "training"} <= config_keys
    # resuming continues the same wandb run
    Trainer(load_config(recipe, overrides), world).train()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(run_id in f.name for f in files)


def _run_in_terminal(cmd: list[str], cwd: Path) -> str:
    """Run `cmd` with stdout on a pseudo-terminal of 120 columns; return what it printed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=follower, stderr=subprocess.DEVNULL, env=training_env({"COLUMNS": "120"})
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal_plain_lines_otherwise(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world
) -> None:
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, tmp_path / "tty"))
    cmd = [
        sys.executable,
        str(REPO / "torchrun_train.py"),
        str(recipe),
        "export.enabled=false",
        "training.max_steps=6",
    ]
    shown = _run_in_terminal(cmd, REPO)
    assert ("training:" in shown and "%|" in shown and "step/s" in shown) or "s/step" in shown
    assert "reference log-probs (train):" in shown and "step 6 | loss" in shown
    piped = main_in_process(recipe, [f"job.output_dir={tmp_path / 'pipe'}", "export.enabled=false"])
    assert piped.returncode == 0 and "%|" not in piped.stdout and "\r" not in piped.stdout
    assert [line for line in piped.stdout.splitlines() if line.startswith("step ")]


@pytest.mark.slow
def test_two_nodes_on_loopback_equal_one_node_with_two_processes(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict
) -> None:
    tables = base_tables(tiny_model_dir, small_data, tmp_path / "unused")
    tables["training"]["micro_batch_size"] = 2
    recipe = write_recipe(tmp_path / "r.toml", tables)
    single = tmp_path / "single"
    proc = run_training(recipe, [f"job.output_dir={single}"], nproc=2, forked=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=fsdpo-test",
                str(REPO / "torchrun_train.py"),
                str(recipe),
                f"job.output_dir={multi}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=training_env(),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    for a, b in zip(train_rows(single), train_rows(multi)):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6, abs_tol=1e-7), (a, b)
    wa, wb = load_final_weights(single), load_final_weights(multi)
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


class FakeHfApi:
    calls: typing.ClassVar[list] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs: object) -> object:
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": "https://hub.example/commit/1"})()


def test_hub_push_and_post_train_command(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict, world, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    secret = "hf_secret_token_that_must_not_leak"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    command = "ls {model_dir} && echo output={output_dir} && exit 3"
    overrides = [
        "training.max_steps=2", "hub.push=true", "hub.repo_id=org/model", f"post_train.command={command}",
    ]  # fmt: skip
    cfg = load_config(recipe, overrides)
    trainer = Trainer(cfg, world)
    trainer.train()
    assert FakeHfApi.calls == []  # rank 0 pushes only after the process group is torn down
    finish(cfg.hub, cfg.post_train, trainer.run_dir)
    assert FakeHfApi.calls == [
        ("create_repo", "org/model", {"private": True, "repo_type": "model", "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": "org/model",
                "folder_path": str(out / "final"),
                "repo_type": "model",
                "commit_message": "Upload model trained with fsdpo",
            },
        ),
    ]
    record = json.loads((out / "post_train.json").read_text())
    assert record["exit_code"] == 3 and str(out / "final") in record["command"]
    log = (out / "post_train.log").read_text()
    assert "model.safetensors" in log and f"output={out}" in log
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_long_post_train_command_leaves_no_rank_in_a_collective(
    tmp_path: Path, tiny_model_dir: Path, small_data: dict
) -> None:
    """Rank 0's post-train command runs after the process group is torn down: with a collective
    timeout of 6 s, an 8 s command would time rank 1 out in a barrier if it still waited."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", base_tables(tiny_model_dir, small_data, out))
    overrides = ["training.max_steps=1", "training.micro_batch_size=4", "data.eval=[]"]
    overrides += ["parallel.collective_timeout_s=6"]
    overrides += ["post_train.command=sleep 8 && echo evaluated {model_dir}"]
    proc = run_training(recipe, overrides, nproc=2, forked=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "post_train.json").read_text())
    assert record["exit_code"] == 0 and record["seconds"] >= 8
    assert "evaluated" in (out / "post_train.log").read_text()


def test_each_process_takes_its_local_rank_modulo_the_gpus_it_sees() -> None:
    from engine.distributed import cuda_device_index

    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))  # one process per GPU
    assert [cuda_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # one visible GPU each
    assert [cuda_device_index(r, 2) for r in range(4)] == [0, 1, 0, 1]
