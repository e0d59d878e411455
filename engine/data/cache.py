"""The tokenisation cache: each source is tokenised once, then memory-mapped by every later run.

A source's tokenised rows live in `<cache_dir>/<key>/` (Arrow files written by `datasets.map`,
plus `manifest.json`). The key is a sha256 over what the tokenised rows depend on: the source's
identity (sources.py), the tokenizer (a hash of its saved files, chat template included), the
`data.chat_template` override, `data.format`, the column names and `TOKENIZATION_VERSION`. Length
limits, `on_bad_row`, sampling and the seed are applied afterwards (dataset.py) and are not part
of the key: changing them reuses the cache and never gives stale results.

A folder is built under a staging name and renamed into place, so a visible folder is complete.
One that cannot be read (deleted files, a crash of another tool) is rebuilt.

Under torch.distributed, rank 0 builds what is missing while the other ranks wait, then every
rank memory-maps the same files (the page cache shares them). Rank 0's outcome, including a
user error, is broadcast, so every rank stops with the same message. If some node cannot see
rank 0's folder (a node-local cache_dir), the first rank of that node builds its own copy.
The waiting happens on a gloo group with a long timeout, since tokenising a large mixture can
outlast the default collective timeout.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from engine.data import tokenize
from engine.data.sources import ResolvedSource
from engine.distributed import from_main, log
from engine.errors import UserError
from engine.hashing import sha256_json

if TYPE_CHECKING:
    import datasets

TOKENIZATION_VERSION = 2  # 2: unpaired rows (formats.py) tokenise instead of being bad rows
"""Bump when tokenize.py's output for the same inputs changes: old cache folders go unused."""
ROWS_PER_PROCESS = 10_000  # data.num_proc = 0: one tokenising process per this many rows
STAGING_MAX_AGE_S = 7 * 24 * 3600  # older staging folders are leftovers of killed runs


@functools.cache
def features() -> datasets.Features:
    """The columns of a tokenised source (`datasets` is imported here, where it is used, so the
    model and forward side of the engine import without it)."""
    import datasets

    ids = getattr(datasets, "List", datasets.Sequence)(datasets.Value("int32"))
    return datasets.Features(
        {
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "common_prefix": datasets.Value("int32"),
            "status": datasets.Value("string"),
            "problem": datasets.Value("string"),
            "line": datasets.Value("int32"),
        }
    )


@dataclass
class TokenizedSource:
    """One source's rows, tokenised and untruncated, in source order (memory-mapped)."""

    name: str
    table: pa.Table  # the `features()` columns, one row per source row
    files: list[str]  # the source's files (for row locations in messages); [] for hub/saved
    offsets: list[int]  # first row of each file
    folder: Path

    def location(self, row: int) -> str:
        """Where row `row` is, for messages: the file (in a folder), the row and the JSON line."""
        where = f"row {row}"
        if len(self.files) > 1:
            k = max(i for i, start in enumerate(self.offsets) if start <= row)
            where = f"{self.files[k]}: row {row - self.offsets[k]}"
        line = self.table.column("line")[row].as_py()
        return where + (f" (line {line})" if line >= 0 else "")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fsdpo" / "tokenized"


def _num_proc(setting: int, rows: int) -> int:
    if setting > 0:
        return max(1, min(setting, rows))
    return max(1, min(8, os.cpu_count() or 1, rows // ROWS_PER_PROCESS))


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def is_cached(folder: Path) -> bool:
    return _read_manifest(folder) is not None


def load_cached(folder: Path, name: str) -> TokenizedSource | None:
    """The tokenised source in `folder`, or None if it is missing or unreadable."""
    manifest = _read_manifest(folder)
    if manifest is None:
        return None
    try:
        tables = [pa.ipc.open_stream(pa.memory_map(str(folder / s))).read_all() for s in manifest["shards"]]
        table = pa.concat_tables(tables) if tables else features().arrow_schema.empty_table()
    except (OSError, pa.ArrowException, KeyError):
        return None
    if table.num_rows != manifest["rows"]:
        return None
    return TokenizedSource(name, table, manifest["files"], manifest["offsets"], folder)


def _build(
    source: ResolvedSource,
    folder: Path,
    identity: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None,
    fmt: str,
    columns: dict[str, str],
    num_proc: int,
) -> None:
    start = time.perf_counter()
    rows, offsets = source.read_pairs(fmt, columns)
    staging = folder.parent / f".staging-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise UserError(
            f"data.cache_dir: cannot create a folder in {folder.parent} ({e.strerror or e})"
        ) from None
    try:
        processes = _num_proc(num_proc, len(rows))
        mapped = rows.map(
            functools.partial(
                tokenize.tokenize_rows,
                tokenizer=tokenizer,
                chat_template=chat_template,
                fmt=fmt,
                columns=columns,
            ),
            batched=True,
            batch_size=256,
            with_indices=True,
            remove_columns=rows.column_names,
            features=features(),
            num_proc=processes if processes > 1 else None,
            cache_file_name=str(staging / "data.arrow"),
            new_fingerprint=folder.name,
            load_from_cache_file=False,
            desc=f"tokenising {source.name}",
        )
        shards = [Path(f["filename"]).name for f in mapped.cache_files]
        manifest = {
            "key": folder.name,
            "source": source.name,
            "identity": identity,
            "files": source.file_names,
            "offsets": offsets,
            "rows": len(rows),
            "shards": shards,
            "tokenization_version": TOKENIZATION_VERSION,
        }
        del mapped
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if folder.exists():  # unreadable (or just built by a concurrent job): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(staging, folder)
        except OSError:
            if _read_manifest(folder) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.perf_counter() - start
    log(
        f"data: tokenised {source.name}: {len(rows)} rows in {elapsed:.1f}s "
        f"({len(rows) / max(elapsed, 1e-9):.0f} rows/s, {processes} processes) -> {folder}"
    )


def _remove_abandoned_staging(cache_dir: Path) -> None:
    """Remove staging folders untouched for a week: leftovers of builds that were killed."""
    if not cache_dir.is_dir():
        return
    for staging in cache_dir.glob(".staging-*"):
        try:
            if time.time() - staging.stat().st_mtime > STAGING_MAX_AGE_S:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            pass


def ensure_tokenized(
    sources: list[ResolvedSource],
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None,
    fmt: str,
    global_columns: dict[str, str],
    cache_dir: Path,
    num_proc: int,
) -> list[str]:
    """Build every missing cache folder; return their names (one per source, in order)."""
    _remove_abandoned_staging(cache_dir)
    fingerprint = tokenize.tokenizer_fingerprint(tokenizer)
    names = []
    for source in sources:
        columns = source.config.columns or global_columns
        identity = {
            "version": TOKENIZATION_VERSION,
            "source": source.identity(),
            "tokenizer": fingerprint,
            "chat_template": chat_template,
            "format": fmt,
            "columns": columns,
        }
        folder = cache_dir / sha256_json(identity)[:24]
        if load_cached(folder, source.name) is None:
            _build(source, folder, identity, tokenizer, chat_template, fmt, columns, num_proc)
        names.append(folder.name)
    return names


def _attempt(fn: Callable[[], Any]) -> tuple[tuple[str, Any], BaseException | None]:
    """(outcome to broadcast, the exception to re-raise here)."""
    try:
        return ("ok", fn()), None
    except UserError as e:
        return ("user_error", str(e)), e
    except BaseException as e:
        return ("crash", f"{type(e).__name__}: {e}"), e


def _unwrap(outcome: tuple[str, Any], who: str) -> Any:
    status, value = outcome
    if status == "user_error":
        raise UserError(value)
    if status == "crash":
        raise RuntimeError(f"{who} failed while preparing the tokenised data: {value}")
    return value


def run_on_rank0_first(build: Callable[[], list[str]], visible: Callable[[list[str]], bool]) -> list[str]:
    """`build()` on rank 0 while the others wait; then on the first rank of each node that cannot
    see the result (`visible`). Every rank returns rank 0's result or raises its error."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return build()
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))
    try:
        outcome, error = _attempt(build) if rank == 0 else (None, None)
        shared = from_main(outcome, group)
        if error is not None:
            raise error
        result = _unwrap(shared, "rank 0")
        missing: list[Any] = [None] * world
        dist.all_gather_object(missing, not visible(result), group=group)
        if any(missing):  # node-local cache folders: each such node builds its own copy
            first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
            mine, error = _attempt(build) if missing[rank] and first_on_node else (("ok", result), None)
            outcomes: list[Any] = [None] * world
            dist.all_gather_object(outcomes, mine, group=group)
            if error is not None:
                raise error
            for r, other in enumerate(outcomes):
                if _unwrap(other, f"rank {r}") != result:
                    raise UserError(
                        f"data: rank {r} tokenised other data than rank 0 (do all nodes see the same files?)"
                    )
            if not visible(result):
                raise UserError("data: the tokenised data is not visible on this rank (check data.cache_dir)")
        return result
    finally:
        dist.destroy_process_group(group)
