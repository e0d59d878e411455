"""The output folder (`job.output_dir`): which files fsdpo wrote there, the only ones it replaces or deletes.

Rank 0 records every file it writes (and every file of a checkpoint or export once published) in
`fsdpo-manifest.json` inside the folder, rewritten atomically after each change. Staging folders
(`checkpoints/.step-N.incomplete`, `final.incomplete`) are claimed in the manifest before they are
created, so a crash's leftovers can be removed whole. Anything else under the run's own paths
(`RUN_PATHS`) is a file fsdpo did not write: a run refuses to start, and an export refuses to
replace `final/`, rather than touch it, naming the file. Files elsewhere in the folder (notes,
scripts, `wandb/`, the reference cache) are never looked at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from engine.errors import UserError

MANIFEST = "fsdpo-manifest.json"
# what a run writes directly under output_dir: each is replaced or deleted only through RunDir
RUN_PATHS = (
    "metrics.jsonl",
    "recipe.toml",
    "data_stats.json",
    "final",
    "final.incomplete",
    "checkpoints",
    "post_train.json",
    "post_train.log",
    "wandb_run_id",
)
# the paths whose presence means "a previous run is here" (a fresh start needs job.overwrite)
PREVIOUS_RUN = ("metrics.jsonl", "recipe.toml", "final", "checkpoints")


class RunDir:
    """The manifest of one output folder. Reads on every rank; only the main rank changes files."""

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path, self.is_main = path, is_main
        self.files: set[str] = set()
        self.folders: set[str] = set()  # claimed staging folders, removable whole
        manifest = path / MANIFEST
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
                self.files, self.folders = set(saved["files"]), set(saved["folders"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(
                    f"job.output_dir: {manifest} is unreadable ({type(e).__name__}: {e}); fsdpo uses it to "
                    "know its own files: restore it or choose another job.output_dir"
                ) from None

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def _save(self) -> None:
        staging = self.path / (MANIFEST + ".tmp")
        body = {"files": sorted(self.files), "folders": sorted(self.folders)}
        staging.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(staging, self.path / MANIFEST)

    def _claimed(self, rel: str) -> bool:
        return any(rel == f or rel.startswith(f + "/") for f in self.folders)

    # -- queries (any rank) ---------------------------------------------------------------------

    def foreign_files(self, names: tuple[str, ...] = RUN_PATHS) -> list[Path]:
        """Files under the run's own paths that fsdpo did not write, in sorted order."""
        found: list[Path] = []
        for name in names:
            top = self.path / name
            candidates = sorted(p for p in top.rglob("*") if not p.is_dir()) if top.is_dir() else [top]
            for p in candidates:
                rel = self._rel(p)
                if (p.exists() or p.is_symlink()) and rel not in self.files and not self._claimed(rel):
                    found.append(p)
        return found

    def check_replaceable(self, path: Path, what: str) -> None:
        """UserError naming the first file under `path` that fsdpo did not write."""
        foreign = self.foreign_files((self._rel(path),))
        if foreign:
            raise _foreign_file_error(foreign[0], self.path, what)

    # -- changes (main rank only; no-ops elsewhere) ---------------------------------------------

    def record(self, *paths: Path) -> None:
        """Note `paths` (files, or every file under a folder) as fsdpo's own."""
        if not self.is_main:
            return
        for path in paths:
            files = [p for p in path.rglob("*") if not p.is_dir()] if path.is_dir() else [path]
            self.files.update(self._rel(p) for p in files)
        self._save()

    def claim(self, folder: Path) -> None:
        """Note a staging folder before creating it: it is fsdpo's whole, whatever it holds."""
        if not self.is_main:
            return
        self.folders.add(self._rel(folder))
        self._save()

    def remove(self, path: Path) -> None:
        """Delete fsdpo's own files under `path` (a claimed folder whole), then the folders left empty.
        Files fsdpo did not write stay where they are."""
        if not self.is_main:
            return
        rel = self._rel(path)
        if rel in self.folders:
            shutil.rmtree(path, ignore_errors=True)
            self.folders.discard(rel)
        elif path.is_dir():
            for claimed in [f for f in self.folders if f.startswith(rel + "/")]:
                shutil.rmtree(self.path / claimed, ignore_errors=True)
                self.folders.discard(claimed)
            for p in sorted(path.rglob("*"), reverse=True):  # children before their folders
                if p.is_dir():
                    with contextlib.suppress(OSError):  # still holds a file fsdpo did not write
                        p.rmdir()
                elif self._rel(p) in self.files:
                    p.unlink()
            with contextlib.suppress(OSError):
                path.rmdir()
        elif rel in self.files and path.exists():
            path.unlink()
        self.files = {f for f in self.files if not (f == rel or f.startswith(rel + "/"))}
        self._save()

    def publish(self, staging: Path, final: Path) -> None:
        """Rename a claimed staging folder to `final` (which must hold nothing foreign) and own its files."""
        if not self.is_main:
            return
        self.check_replaceable(final, f"publishing {staging.name}")
        if final.exists():
            self.remove(final)
        os.replace(staging, final)
        self.folders.discard(self._rel(staging))
        self.record(final)


def _foreign_file_error(file: Path, output_dir: Path, what: str) -> UserError:
    return UserError(
        f"job.output_dir: {file} was not written by fsdpo (it is not in {output_dir / MANIFEST}) and {what} "
        "would replace or delete it; fsdpo never touches files it did not write: move it out of the "
        "folder or choose another job.output_dir"
    )


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse a folder a run must not write into; changes nothing (`prepare_output_dir` does)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"job.output_dir: {output_dir} exists and is not a folder")
    foreign = RunDir(output_dir).foreign_files()
    if foreign:
        raise _foreign_file_error(foreign[0], output_dir, "this run")
    previous = [name for name in PREVIOUS_RUN if (output_dir / name).exists()]
    if not resuming and previous and not overwrite:
        raise UserError(
            f"job.output_dir: {output_dir} already holds a run ({', '.join(previous)}); "
            "resume it (checkpoint.resume=auto needs a checkpoint), choose another folder or set job.overwrite=true"
        )


def prepare_output_dir(run_dir: RunDir, overwrite: bool, resume_step: int | None) -> None:
    """Collective: make the output folder ready, once every input has loaded.

    Resuming keeps the folder and drops the metrics rows logged after the checkpoint (the resumed
    run logs those steps again). Starting fresh over a previous run (`job.overwrite`) removes that
    run's own files and nothing else.
    """
    output_dir = run_dir.path
    check_output_dir(output_dir, overwrite, resume_step is not None)
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 changes anything
    if run_dir.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics = output_dir / "metrics.jsonl"
        if resume_step is None:
            for name in RUN_PATHS:
                run_dir.remove(output_dir / name)
            metrics.write_text("")
        elif metrics.exists():
            kept = [
                line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= resume_step
            ]
            metrics.write_text("".join(line + "\n" for line in kept))
        else:
            metrics.write_text("")
        run_dir.record(metrics)
    if dist.is_initialized():
        dist.barrier()
