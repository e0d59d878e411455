"""One hashing rule for every cache key (engine/hashing.py), and the copies it replaced agree.

The tokenized-data cache used `json.dumps(sort_keys=True)` (spaces after separators) and the
reference cache a compact canonical form; the canonical form won (one serialisation, key order
and whitespace never change a key), and these tests pin it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.config import DataConfig, DataSource, ModelConfig
from engine.data import build_dataset
from engine.data.sources import resolve_source
from engine.hashing import canonical_json, sha256_file, sha256_json
from engine.model import build_tokenizer
from tests.conftest import ASSETS


def test_canonical_json_ignores_key_order_and_keeps_text_as_is() -> None:
    a = {"b": [1, 2.5, None], "a": {"y": "é", "x": True}}
    b = {"a": {"x": True, "y": "é"}, "b": [1, 2.5, None]}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":true,"y":"é"},"b":[1,2.5,null]}'
    assert sha256_json(a) == hashlib.sha256(canonical_json(b).encode()).hexdigest()


def test_file_digest_is_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 40_000  # over one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_the_tokenized_cache_and_data_files_use_the_one_rule(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi", "chosen": " yes", "rejected": " no"}) + "\n")
    source = DataSource(path=str(rows))
    tokenizer = build_tokenizer(ModelConfig(path=str(ASSETS / "tiny-llama")))
    build_dataset([source], tokenizer, DataConfig(max_length=64, cache_dir=str(tmp_path / "c")), 0)
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "c").rglob("manifest.json")]
    assert manifest["key"] == sha256_json(manifest["identity"])[:24]
    assert resolve_source(source, "train").identity()["files"][0]["sha256"] == sha256_file(rows)
