"""Post-training, in the two phases its work needs: the export of final/ (`export_final`,
collective: every rank gathers its shards, so it ends the trainer's `train()`, before the process
group goes), then on rank 0 once the process group is torn down the push of final/ to the Hugging
Face Hub and the user's command (`finish`). No other rank waits for the latter in a collective,
so a command (an evaluation) that takes hours cannot trip a collective timeout.

The hub token is never read from the recipe: `huggingface_hub` takes it from the environment
(`HF_TOKEN`) or its login cache, and nothing here writes it anywhere.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from engine.config import Config, HubConfig, PostTrainConfig
from engine.distributed import World, log, log_error
from engine.errors import UserError, first_line
from engine.export import export_hf
from engine.run_dir import RunDir


def export_final(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: Config, world: World, run_dir: RunDir
) -> None:
    """Collective: the trained model as a Hugging Face folder, output_dir/final (`[export]`)."""
    if not cfg.export.enabled:
        return
    final = run_dir.path / "final"
    export_hf(model, tokenizer, cfg.model, final, cfg.export, cfg.lora, world.is_main, run_dir)
    log(f"exported {final}")


def finish(hub: HubConfig, post_train: PostTrainConfig, run_dir: RunDir) -> None:
    """Rank 0's work after training: the hub upload, then the post-train command."""
    model_dir = run_dir.path / "final"
    if hub.push:
        push_to_hub(model_dir, hub)
    if post_train.command:
        run_post_train_command(post_train, model_dir, run_dir)


def push_to_hub(model_dir: Path, cfg: HubConfig) -> str:
    """Create (or reuse) `cfg.repo_id` and upload `model_dir`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(cfg.repo_id, private=cfg.private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=cfg.repo_id,
            folder_path=str(model_dir),
            repo_type="model",
            commit_message=cfg.commit_message,
        )
    except Exception as e:  # network, auth, quota: the model is saved; say so and stop with 2
        first = first_line(e)
        raise UserError(
            f"hub.repo_id: upload of {model_dir} to {cfg.repo_id} failed ({first}); final/ is intact"
        ) from None
    url = getattr(commit, "commit_url", str(commit))
    log(f"pushed {model_dir} to {cfg.repo_id}: {url}")
    return url


def run_post_train_command(cfg: PostTrainConfig, model_dir: Path, run_dir: RunDir) -> int:
    """Run the command with {model_dir} and {output_dir} substituted (shell-quoted).

    Its output goes to output_dir/post_train.log and its exit status, duration and command to
    output_dir/post_train.json. A failing command is reported, not fatal: the model is saved.
    """
    output_dir = run_dir.path
    command = cfg.command.format(
        model_dir=shlex.quote(str(model_dir)), output_dir=shlex.quote(str(output_dir))
    )
    log(f"post-train: {command}")
    start = time.perf_counter()
    with open(output_dir / "post_train.log", "w", encoding="utf-8") as out:
        code = subprocess.run(
            command, shell=True, stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    record = {"command": command, "exit_code": code, "seconds": round(time.perf_counter() - start, 3)}
    (output_dir / "post_train.json").write_text(json.dumps(record, indent=2) + "\n")
    run_dir.record(output_dir / "post_train.log", output_dir / "post_train.json")
    if code != 0:
        log_error(
            f"fsdpo: warning: post-train command exited with {code}; see {output_dir / 'post_train.log'}"
        )
    return code
