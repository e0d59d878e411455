"""Data sources: where rows come from, what identifies them, and reading them as a `datasets.Dataset`.

A `[data]` source path is, in this order:
- a local file: .json (an array of objects, or JSON lines), .jsonl or .parquet;
- a local folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict read at
  `split`);
- a local folder of .json/.jsonl/.parquet files (all of one kind, read in sorted order, recursively);
- otherwise a Hugging Face hub id, loaded by `datasets.load_dataset(path, name=subset,
  split=split, revision=revision)`, which serves it from the local cache when offline.

JSON rows are kept as their raw text (parsed while tokenising), so one malformed or oddly typed
row is a bad row to report or skip, not a schema error for the whole file. Parquet and `datasets`
rows are typed Arrow columns.

A source's identity (for the tokenisation cache) is its files' paths, sizes and content hashes
(size and mtime for files over `HASH_LIMIT`), or for hub ids and saved folders the `datasets`
fingerprint of the loaded split together with the path, subset, split and revision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import DataSource
from engine.data.formats import check_columns
from engine.errors import UserError, first_line
from engine.hashing import sha256_file

if TYPE_CHECKING:
    import datasets

JSON_SUFFIXES = (".json", ".jsonl")
DATA_SUFFIXES = (*JSON_SUFFIXES, ".parquet")
HASH_LIMIT = 256 * 2**20  # files up to this size are identified by content, larger by size + mtime


@dataclass
class ResolvedSource:
    """A source whose kind and files are known; reading its rows is `read()`."""

    config: DataSource
    name: str  # how messages name it, e.g. "data.train[0] (prefs.jsonl)"
    kind: str  # "json", "parquet", "saved" or "hub"
    files: list[Path] = field(default_factory=list)
    _loaded: datasets.Dataset | None = None

    @property
    def file_names(self) -> list[str]:
        """Files relative to the source folder (a single file: its name), for messages."""
        root = Path(self.config.path).expanduser()
        return [str(f.relative_to(root)) if root.is_dir() else f.name for f in self.files]

    def identity(self) -> dict[str, Any]:
        """What the tokenised rows of this source depend on, as JSON-able values."""
        if self.kind in ("json", "parquet"):
            return {"kind": self.kind, "files": [_file_identity(f) for f in self.files]}
        c = self.config
        return {
            "kind": self.kind,
            "path": c.path if self.kind == "hub" else str(Path(c.path).expanduser().resolve()),
            "subset": c.subset,
            "split": c.split,
            "revision": c.revision,
            "fingerprint": self._load_arrow()._fingerprint,
        }

    def read(self, limit: int | None = None) -> tuple[datasets.Dataset, list[int]]:
        """(rows, first row of each file); a UserError if there are none. JSON rows have columns
        `__json` and `__line`. With `limit`, only the first `limit` rows (the dry run's sample;
        every file's columns still count, as in the whole read)."""
        rows, offsets = self._read(limit)
        if len(rows) == 0:
            raise UserError(f"{self.name}: no rows")
        return rows, offsets

    def read_pairs(
        self, fmt: str, columns: dict[str, str], limit: int | None = None
    ) -> tuple[datasets.Dataset, list[int]]:
        """`read`, keeping of typed rows only the pair's columns (`check_columns`: a UserError
        when one is missing)."""
        rows, offsets = self.read(limit)
        if "__json" not in rows.column_names:
            rows = rows.select_columns(check_columns(self.name, rows.column_names, fmt, columns))
        return rows, offsets

    def _read(self, limit: int | None) -> tuple[datasets.Dataset, list[int]]:
        import datasets

        left = float("inf") if limit is None else limit
        if self.kind == "json":
            texts, lines, offsets = [], [], []
            for path in self.files:
                offsets.append(len(texts))
                _read_json_file(path, texts, lines, self.name, left - len(texts))
            return datasets.Dataset.from_dict({"__json": texts, "__line": lines}), offsets
        if self.kind == "parquet":
            tables, offsets, total = [], [], 0
            for path in self.files:
                try:
                    table = pq.read_table(path) if limit is None else _parquet_head(path, left - total)
                except (OSError, pa.ArrowException) as e:
                    raise UserError(f"{self.name}: {path}: not a readable parquet file ({e})") from None
                offsets.append(total)
                total += table.num_rows
                tables.append(table)
            try:
                table = pa.concat_tables(tables, promote_options="permissive")
            except pa.ArrowException as e:
                raise UserError(f"{self.name}: the parquet files have incompatible columns ({e})") from None
            return datasets.Dataset(datasets.table.InMemoryTable(table)), offsets
        rows = self._load_arrow()
        return (rows if limit is None else rows.select(range(min(limit, len(rows))))), [0]

    def _load_arrow(self) -> datasets.Dataset:
        if self._loaded is None:
            self._loaded = _load_saved(self) if self.kind == "saved" else _load_hub(self)
        return self._loaded


def _file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    identity: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size}
    if st.st_size <= HASH_LIMIT:
        identity["sha256"] = sha256_file(path)
    else:
        identity["mtime_ns"] = st.st_mtime_ns
    return identity


def _parquet_head(path: Path, limit: float) -> pa.Table:
    """The first `limit` rows of a parquet file (none: its schema alone), reading no more."""
    file = pq.ParquetFile(path)
    if limit < 1:
        return file.schema_arrow.empty_table()
    batch = next(file.iter_batches(batch_size=int(min(limit, 2**20))), None)
    return pa.Table.from_batches([batch]) if batch is not None else file.schema_arrow.empty_table()


def _read_json_file(path: Path, texts: list[str], lines: list[int], name: str, limit: float) -> None:
    """Append each row of a .json/.jsonl file as JSON text (and its line number, or -1), up to
    `limit` rows."""
    if limit < 1:
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: cannot read {path} ({e})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text) if limit == float("inf") else _json_array_head(text, int(limit))
        except json.JSONDecodeError as e:
            raise UserError(f"{name}: {path.name} is not a valid JSON array ({e})") from None
        texts.extend(json.dumps(row, ensure_ascii=False) for row in rows)
        lines.extend([-1] * len(rows))
        return
    start = len(texts)
    for n, line in enumerate(text.splitlines()):
        if len(texts) - start >= limit:
            break
        if line.strip():
            texts.append(line)
            lines.append(n + 1)


def _json_array_head(text: str, limit: int) -> list[Any]:
    """The first `limit` elements of the JSON array `text`, parsing no further."""
    decoder, rows = json.JSONDecoder(), []
    i = text.index("[") + 1
    while len(rows) < limit:
        i = _skip_space(text, i)
        if text.startswith("]", i):
            break
        row, i = decoder.raw_decode(text, i)
        rows.append(row)
        i = _skip_space(text, i)
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            raise json.JSONDecodeError("expected ',' or ']'", text, i)
    return rows


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(source: ResolvedSource) -> datasets.Dataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(Path(source.config.path).expanduser()))
    except (OSError, ValueError) as e:
        raise UserError(f"{source.name}: cannot load the saved data set ({e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.config.split not in loaded:
            raise UserError(
                f"{source.name}: no split {source.config.split!r} (splits: {', '.join(loaded)}); "
                "set `split` in the source's table"
            )
        loaded = loaded[source.config.split]
    return loaded


def _load_hub(source: ResolvedSource) -> datasets.Dataset:
    import datasets

    c = source.config
    try:
        return datasets.load_dataset(
            c.path, name=c.subset or None, split=c.split, revision=c.revision or None
        )
    except (OSError, ValueError, ImportError, ConnectionError, datasets.exceptions.DatasetsError) as e:
        first = first_line(e)
        raise UserError(
            f"{source.name}: not a local file or folder, and loading it as a hub data set failed ({first})"
        ) from None


def resolve_source(source: DataSource, name: str) -> ResolvedSource:
    """Decide what `source.path` is (see the module docstring) without reading any rows."""
    path = Path(source.path).expanduser()
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise UserError(f"{name}: expected a .json, .jsonl or .parquet file")
        return ResolvedSource(source, name, "parquet" if path.suffix == ".parquet" else "json", [path])
    if path.is_dir():
        if _is_saved_dataset(path):
            return ResolvedSource(source, name, "saved")
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in DATA_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"{name}: the folder holds no .json, .jsonl or .parquet file")
        kinds = {"parquet" if p.suffix == ".parquet" else "json" for p in files}
        if len(kinds) > 1:
            raise UserError(f"{name}: the folder mixes JSON and parquet files; give them as two sources")
        return ResolvedSource(source, name, kinds.pop(), files)
    if source.path.startswith((".", "/", "~")) or path.suffix in DATA_SUFFIXES or source.path.count("/") > 1:
        raise UserError(f"{name}: data file not found")
    return ResolvedSource(source, name, "hub")
