"""Reference log-prob cache: reference log-probs persisted once, reused by later runs.

A cache file is only ever read under a `CacheKey` built from everything that changes the numbers:
the model (config.json and a content hash of its weight files, or config + seed for a random
init), an optional adapter description, the tokenizer (its saved files, chat template included),
the data settings and sources, the multiset of tokenised pairs, and `LOGPROB_CODE_VERSION`.
Different keys are different files (`reference-<digest>.safetensors`), side by side in one folder.

Values are stored with a 128-bit content hash of each pair (its prompt, chosen and rejected token
ids) and looked up by that hash, not by position: the key identifies the pairs as a multiset, so
a run whose rows come in another order reuses the cache and still gets each pair's own values.
Identical pairs share a hash and therefore a value, which is right because they are the same
pair. World size and batch size are not part of the key: each pair's value is computed from that
pair alone.

A file may also hold LD-DPO's shared-length sums (`ReferenceLogps.chosen_shared`), which a run
with `loss.ld_alpha` < 1 on both sides needs; they change no total, so they are not part of the
key: the file says whether it has them (its tensors, under the checksum), and a run that needs
them treats a file without them as a miss (`ReferenceProvider`), recomputes and replaces it with
one that has them, which then serves both kinds of run. Format 1 files (before them) are under
other keys and never read.

A file is written atomically (temp file in the same folder, then `os.replace`) and carries a
sha256 checksum over its tensors and metadata in the safetensors header, so one file is the
whole truth and a half-written, truncated or bit-flipped file is detected, reported in one line,
and rebuilt by the caller.

Hashing multi-GB weights is memoised in `<cache_dir>/file-hashes.json`, keyed by a file's real
path, size, mtime, ctime and inode. Like git's "racily clean" rule, a file whose mtime or ctime
is younger than `RACY_WINDOW_NS` is hashed but not memoised: file-system timestamps are coarse
(a jiffy on Linux), so a rewrite right after hashing could otherwise keep the same stat.

The table itself (`ReferenceLogps`) lives here, below `engine.reference`, which computes it and
reads and writes it through this module (key -> load -> compute -> save: `ReferenceProvider`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import transformers
from transformers import PreTrainedTokenizerBase

from engine.config import DataConfig, DataSource, ModelConfig
from engine.data import PreferenceDataset
from engine.data.tokenize import tokenizer_file_digests
from engine.distributed import from_main
from engine.errors import UserError, first_line
from engine.hashing import canonical_json, sha256_file, sha256_json
from engine.model import model_folder

LOGPROB_CODE_VERSION = 1
"""Bump when the log-prob math changes (masking, summation, dtype policy): old caches go stale."""
CACHE_FORMAT_VERSION = 2
"""Layout of the cache file; part of the key, so a new layout never reads an old file."""

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.index.json")
REMOTE_CODE_PATTERNS = ("*.py",)  # hashed too when the model runs its own modelling code
PAIR_HASH_BYTES = 16
RACY_WINDOW_NS = 2_000_000_000
MEMO_FILE = "file-hashes.json"
_METADATA_KEY = "fsdpo_reference_cache"
_TENSOR_NAMES = ("chosen_logps", "chosen_tokens", "pair_hashes", "rejected_logps", "rejected_tokens")
_SHARED_NAMES = ("chosen_shared_logps", "rejected_shared_logps")  # optional: LD-DPO
# keys of config.json that do not change the model
_CONFIG_VOLATILE = ("_name_or_path", "transformers_version")


@dataclass
class ReferenceLogps:
    """The reference log-probs of every pair of a dataset. Training keeps them on the device
    (`to`, once: 8 bytes a pair) and looks a micro-batch up there, so no step copies them."""

    chosen: torch.Tensor  # [N] fp32, summed reference log-probs of each pair's chosen completion
    rejected: torch.Tensor  # [N]
    chosen_shared: torch.Tensor | None = None  # [N] LD-DPO: summed over the pair's shared length
    rejected_shared: torch.Tensor | None = None

    @property
    def has_shared(self) -> bool:
        return self.chosen_shared is not None and self.rejected_shared is not None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ReferenceLogps:
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))
        return ReferenceLogps(*(None if t is None else fn(t) for t in fields))

    def to(self, device: torch.device) -> ReferenceLogps:
        return self._map(lambda t: t.to(device))

    def totals(self) -> ReferenceLogps:
        """Without the shared-length sums (a run that does not need them keeps 8 bytes a pair)."""
        return ReferenceLogps(self.chosen, self.rejected)

    def select(self, pair_ids: torch.Tensor, device: torch.device) -> ReferenceLogps:
        """The rows `pair_ids`, indexed where the table lives, on `device` (with the table and
        the ids on `device` already: no copy)."""
        ids = pair_ids.to(self.chosen.device)
        return self._map(lambda t: t.index_select(0, ids).to(device))

    def lookup(self, pair_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) of the pairs `pair_ids` on `device` (`select`)."""
        rows = self.select(pair_ids, device)
        return rows.chosen, rows.rejected


@dataclass(frozen=True)
class CacheKey:
    digest: str
    """16 hex characters of `metadata["digest"]`; names the cache file."""
    metadata: dict[str, Any] = field(hash=False)
    """JSON-able: the full sha256 `digest`, and per component its own `digest` plus readable
    facts (paths, sizes, versions) that help explain why two keys differ."""

    @property
    def file_name(self) -> str:
        return f"reference-{self.digest}.safetensors"


# ----------------------------------------------------------------------------------------------
# Hashing helpers


def _stat_fingerprint(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _read_memo(memo_path: Path | None) -> dict[str, Any]:
    if memo_path is None:
        return {}
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: it is only a shortcut, hash again
    return memo.get("files", {}) if isinstance(memo, dict) else {}


def _write_memo(memo_path: Path, files: dict[str, Any]) -> None:
    files = {p: v for p, v in files.items() if os.path.exists(p)}
    _write_atomically(memo_path, canonical_json({"version": 1, "files": files}).encode())


def hash_files(paths: list[Path], memo_dir: str | Path | None = None) -> list[str]:
    """sha256 of each file's bytes, reusing `<memo_dir>/file-hashes.json` where its stat matches.

    Files that need hashing are read in parallel threads (hashlib releases the GIL), so a sharded
    checkpoint hashes at disk speed rather than one core's sha256 speed.
    """
    memo_path = Path(memo_dir) / MEMO_FILE if memo_dir is not None else None
    memo = _read_memo(memo_path)
    real = [os.path.realpath(p) for p in paths]  # hub snapshots are symlinks into blobs/
    before = [_stat_fingerprint(os.stat(p)) for p in real]
    digests: list[str | None] = []
    for path, st in zip(real, before):
        entry = memo.get(path)
        known = isinstance(entry, dict) and entry.get("stat") == st and isinstance(entry.get("sha256"), str)
        digests.append(entry["sha256"] if known else None)
    todo = [i for i, d in enumerate(digests) if d is None]
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, len(todo), os.cpu_count() or 1)) as pool:
            for i, digest in zip(todo, pool.map(lambda i: sha256_file(Path(real[i])), todo)):
                digests[i] = digest
        if memo_path is not None:
            now = time.time_ns()
            fresh = False
            for i in todo:
                st = before[i]
                settled = now - max(st["mtime_ns"], st["ctime_ns"]) > RACY_WINDOW_NS
                if settled and _stat_fingerprint(os.stat(real[i])) == st:
                    memo[real[i]] = {"stat": st, "sha256": digests[i]}
                    fresh = True
            if fresh:
                memo_path.parent.mkdir(parents=True, exist_ok=True)
                _write_memo(memo_path, memo)
    return digests  # type: ignore[return-value]


def hash_files_on_rank_zero(paths: list[Path], memo_dir: str | Path | None = None) -> list[str]:
    """`hash_files` on rank 0 only, the digests (or its error) broadcast: collective under a process
    group. Every rank of a job keys the same weights, so one read of 16-140 GB of files per job is
    enough, not one per rank (8 ranks x 8 threads over the same files)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return hash_files(paths, memo_dir)
    result: list[str] | OSError | None = None
    if dist.get_rank() == 0:
        try:
            result = hash_files(paths, memo_dir)
        except OSError as e:  # an unreadable weight file: every rank raises it, none waits forever
            result = e
    result = from_main(result)
    if isinstance(result, OSError):
        raise result
    return result


def pair_hashes(dataset: PreferenceDataset) -> list[bytes]:
    """A 16-byte content hash per pair, in `dataset.pairs` order.

    sha256 over the three lengths and the int32 ids (little-endian), truncated to 128 bits;
    identical token lists give identical hashes whatever the pair's position.
    """
    swap = sys.byteorder == "big"
    out = []
    for pair in dataset.pairs:
        ids = array("i", pair.prompt_ids)
        ids.extend(pair.chosen_ids)
        ids.extend(pair.rejected_ids)
        lengths = array("i", (len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)))
        if swap:
            ids.byteswap()
            lengths.byteswap()
        digest = hashlib.sha256(lengths.tobytes())
        digest.update(ids.tobytes())
        out.append(digest.digest()[:PAIR_HASH_BYTES])
    return out


# ----------------------------------------------------------------------------------------------
# Key components


def _load_config_json(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if k not in _CONFIG_VOLATILE}


def _model_component(model_cfg: ModelConfig, seed: int, memo_dir: str | Path | None) -> dict[str, Any]:
    """Model identity by content, not location: a copied or moved folder keeps its key."""
    folder, source = model_folder(model_cfg.path)
    facts: dict[str, Any] = {"path": model_cfg.path, "source": source}
    identity: dict[str, Any] = {"attn_implementation": model_cfg.attn_implementation}
    if folder is None:
        # Only the name is known. The trainer loads the model (and so fills the hub cache) before
        # keying, so this is reached only when the model came from elsewhere; the id is the best
        # identity left, and an upstream change under the same id would go unnoticed.
        identity["hub_id"] = model_cfg.path
        identity["revision"] = "unresolved"  # no snapshot: no commit to name
    else:
        facts["folder"] = str(folder)
        identity["config_sha256"] = sha256_json(_load_config_json(folder))
        if model_cfg.random_init:
            # weights are drawn from the seed by torch + transformers' init code
            identity["random_init"] = {
                "seed": seed,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        else:
            patterns = WEIGHT_PATTERNS + (REMOTE_CODE_PATTERNS if model_cfg.trust_remote_code else ())
            files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
            digests = hash_files_on_rank_zero(files, memo_dir)
            identity["files"] = [
                {"name": p.name, "size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)
            ]
    return {"digest": sha256_json(identity), **identity, **facts}


def _tokenizer_component(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer's files (`tokenizer_file_digests`) and the facts a reader checks by eye."""
    files = tokenizer_file_digests(tokenizer)
    template = tokenizer.chat_template
    template_text = template if isinstance(template, str) else canonical_json(template)
    return {
        "digest": sha256_json(files),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template_sha256": hashlib.sha256(template_text.encode()).hexdigest() if template else None,
        "files": files,
    }


TOKEN_SETTINGS = (
    "max_length",
    "max_prompt_length",
    "truncation",
    "format",
    "columns",
    "chat_template",
    "unpair",
    "kl_shift_chunk",
)


def _data_component(
    dataset: PreferenceDataset, data_cfg: DataConfig, sources: list[DataSource]
) -> dict[str, Any]:
    # the [data] settings that decide which tokens a pair has (the pair hashes cover the tokens
    # themselves; settings such as num_proc, cache_dir or group_by_length change no number)
    settings = {name: getattr(data_cfg, name) for name in TOKEN_SETTINGS if hasattr(data_cfg, name)}
    source_list = [
        {
            "path": os.path.abspath(os.path.expanduser(s.path)),
            **{f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name != "path"},
        }
        for s in sources
    ]
    pairs_sha256 = hashlib.sha256(b"".join(sorted(pair_hashes(dataset)))).hexdigest()
    identity = {"settings": settings, "sources": source_list, "pairs_sha256": pairs_sha256}
    return {"digest": sha256_json(identity), **identity, "pairs": len(dataset)}


def reference_cache_key(
    model_cfg: ModelConfig,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    dataset: PreferenceDataset,
    data_cfg: DataConfig,
    adapter: str | None = None,
    *,
    sources: list[DataSource] | None = None,
    extra: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> CacheKey:
    """The key under which `dataset`'s reference log-probs are cached.

    `sources` are the data sources `dataset` was built from (default `data_cfg.train`; pass
    `data_cfg.eval` for the eval set). `extra` holds any other JSON-able setting that changes the
    numbers (e.g. the compute dtype). `cache_dir`, when given, memoises weight-file hashes there.
    """
    components: dict[str, dict[str, Any]] = {
        "code": {
            "logprob_code_version": LOGPROB_CODE_VERSION,
            "cache_format_version": CACHE_FORMAT_VERSION,
        },
        "model": _model_component(model_cfg, seed, cache_dir),
        "tokenizer": _tokenizer_component(tokenizer),
        "data": _data_component(dataset, data_cfg, data_cfg.train if sources is None else sources),
    }
    components["code"]["digest"] = sha256_json(dict(components["code"]))
    if adapter is not None:
        components["adapter"] = {"digest": sha256_json(adapter), "description": adapter}
    if extra:
        components["extra"] = {"digest": sha256_json(dict(extra)), "values": dict(extra)}
    digest = sha256_json({name: c["digest"] for name, c in components.items()})
    metadata = {
        "digest": digest,
        "components": components,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    return CacheKey(digest=digest[:16], metadata=json.loads(canonical_json(metadata)))


# ----------------------------------------------------------------------------------------------
# Storing and loading


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temp file in `path`'s folder, fsync, then rename over `path` (never torn)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata (except the checksum itself) and every tensor's dtype, shape and
    bytes, so a flipped bit anywhere in the file is caught."""
    digest = hashlib.sha256(canonical_json({k: v for k, v in metadata.items() if k != "checksum"}).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(canonical_json([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _hashes_tensor(hashes: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"".join(hashes)), dtype=torch.uint8).reshape(-1, PAIR_HASH_BYTES)


def save_reference_cache(
    cache_dir: str | Path, key: CacheKey, dataset: PreferenceDataset, ref: ReferenceLogps
) -> Path:
    """Write `ref` (indexed like `dataset.pairs`) to `<cache_dir>/reference-<digest>.safetensors`.

    Only the file of this key is (atomically) replaced; files of other keys are never touched.
    """
    n = len(dataset)
    values = {"chosen_logps": ref.chosen, "rejected_logps": ref.rejected}
    if ref.has_shared:
        values.update(chosen_shared_logps=ref.chosen_shared, rejected_shared_logps=ref.rejected_shared)
    shapes = [tuple(v.shape) for v in values.values()]
    if any(shape != (n,) for shape in shapes):
        raise ValueError(f"reference log-probs of shapes {shapes} do not match the {n} pairs of the data set")
    tensors = {
        **{name: v.detach().to("cpu", torch.float32).contiguous() for name, v in values.items()},
        "chosen_tokens": torch.tensor([len(p.chosen_ids) for p in dataset.pairs], dtype=torch.int32),
        "rejected_tokens": torch.tensor([len(p.rejected_ids) for p in dataset.pairs], dtype=torch.int32),
        "pair_hashes": _hashes_tensor(pair_hashes(dataset)),
    }
    metadata = {
        _METADATA_KEY: canonical_json({"format": CACHE_FORMAT_VERSION, "key": key.metadata}),
    }
    metadata["checksum"] = _checksum(tensors, metadata)
    folder = Path(cache_dir)
    path = folder / key.file_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, safetensors.torch.save(tensors, metadata=metadata))
    except OSError as e:
        raise UserError(f"reference.cache_dir: cannot write {path} ({e.strerror or e})") from None
    return path


class _Corrupt(Exception):
    """A cache file that exists but cannot be trusted; the message says why."""


def _read_verified(path: Path, key: CacheKey, dataset: PreferenceDataset) -> ReferenceLogps:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, safetensors.SafetensorError) as e:
        first = first_line(e)
        raise _Corrupt(f"unreadable: {first}") from None
    if "checksum" not in metadata or _METADATA_KEY not in metadata:
        raise _Corrupt("no fsdpo metadata")
    if _checksum(tensors, metadata) != metadata["checksum"]:
        raise _Corrupt("checksum mismatch")
    try:
        header = json.loads(metadata[_METADATA_KEY])
        stored_digest = header["key"]["digest"]
    except (ValueError, KeyError, TypeError):
        raise _Corrupt("unreadable metadata") from None
    if header.get("format") != CACHE_FORMAT_VERSION or stored_digest != key.metadata["digest"]:
        raise _Corrupt("written for another key")
    has_shared = _SHARED_NAMES[0] in tensors
    if sorted(tensors) != sorted(_TENSOR_NAMES + (_SHARED_NAMES if has_shared else ())):
        raise _Corrupt(f"tensors {sorted(tensors)}")
    m = tensors["chosen_logps"].shape[0] if tensors["chosen_logps"].ndim == 1 else -1
    expected = {
        **{name: ((m,), torch.float32) for name in ("chosen_logps", "rejected_logps")},
        **{name: ((m,), torch.float32) for name in (_SHARED_NAMES if has_shared else ())},
        "chosen_tokens": ((m,), torch.int32),
        "rejected_tokens": ((m,), torch.int32),
        "pair_hashes": ((m, PAIR_HASH_BYTES), torch.uint8),
    }
    for name, (shape, dtype) in expected.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype:
            raise _Corrupt(f"{name} has shape {tuple(tensors[name].shape)} and dtype {tensors[name].dtype}")

    stored = tensors["pair_hashes"].numpy().tobytes()
    row_of = {stored[i * PAIR_HASH_BYTES : (i + 1) * PAIR_HASH_BYTES]: i for i in range(m)}
    rows = []
    for pair_id, pair_hash in enumerate(pair_hashes(dataset)):
        row = row_of.get(pair_hash)
        if row is None:
            raise _Corrupt(f"pair {pair_id} of the data set is missing")
        rows.append(row)
    index = torch.tensor(rows, dtype=torch.long)
    chosen_tokens = torch.tensor([len(p.chosen_ids) for p in dataset.pairs], dtype=torch.int32)
    rejected_tokens = torch.tensor([len(p.rejected_ids) for p in dataset.pairs], dtype=torch.int32)
    if not (
        torch.equal(tensors["chosen_tokens"][index], chosen_tokens)
        and torch.equal(tensors["rejected_tokens"][index], rejected_tokens)
    ):
        raise _Corrupt("token counts disagree with the data set")
    names = ("chosen_logps", "rejected_logps", *(_SHARED_NAMES if has_shared else ()))
    return ReferenceLogps(*(tensors[name][index] for name in names))


def load_reference_cache(
    cache_dir: str | Path, key: CacheKey, dataset: PreferenceDataset
) -> ReferenceLogps | None:
    """The cached log-probs of `dataset`'s pairs, in its pair order, bitwise as stored (with
    the shared-length sums when the file has them).

    None when there is no file for `key`, or when the file is corrupt (then one warning line on
    stderr names it; the caller recomputes and `save_reference_cache` replaces it).
    """
    path = Path(cache_dir) / key.file_name
    if not path.is_file():
        return None
    try:
        return _read_verified(path, key, dataset)
    except _Corrupt as e:
        print(
            f"fsdpo: warning: reference cache {path} is corrupt ({e}); rebuilding",
            file=sys.stderr,
            flush=True,
        )
        return None
