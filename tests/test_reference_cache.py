"""Reference log-prob cache: keying, bitwise round trip, lookup by pair hash, corruption, atomicity.

Each key test changes exactly one input and checks that the component it belongs to (and so the
key) changes, that the others do not, and that the file saved under the old key is not found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from engine import reference_cache as rc
from engine.config import DataConfig, DataSource, ModelConfig
from engine.data import PreferenceDataset, TokenizedPair, build_dataset
from engine.errors import UserError
from engine.model import build_tokenizer
from engine.reference_cache import ReferenceLogps
from tests.conftest import ASSETS

# ----------------------------------------------------------------------------------------------
# Helpers


def make_dataset(path: Path, tokenizer, max_length: int = 1024) -> tuple[PreferenceDataset, DataConfig]:
    data_cfg = DataConfig(train=[DataSource(path=str(path))], max_length=max_length)
    return build_dataset(data_cfg.train, tokenizer, data_cfg, seed=0), data_cfg


def fake_reference(dataset: PreferenceDataset, seed: int = 0) -> ReferenceLogps:
    """Distinct values per pair (identical pairs get identical values, as a real run gives),
    with awkward bit patterns that a lossy round trip would change."""
    generator = torch.Generator().manual_seed(seed)
    chosen = -100 * torch.rand(len(dataset), generator=generator)
    rejected = -100 * torch.rand(len(dataset), generator=generator)
    first_of: dict[tuple, int] = {}
    for i, p in enumerate(dataset.pairs):
        j = first_of.setdefault((tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)), i)
        chosen[i], rejected[i] = chosen[j], rejected[j]
    specials = torch.tensor([-0.0, float("nan"), float("-inf"), 1e-45, -3.4e38])
    chosen[: len(specials)] = specials
    return ReferenceLogps(chosen, rejected)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def pair_content(p: TokenizedPair) -> tuple:
    return tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)


def digests(key: rc.CacheKey) -> dict[str, str]:
    return {name: c["digest"] for name, c in key.metadata["components"].items()}


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return build_tokenizer(ModelConfig(path=str(tiny_model_dir)))


@pytest.fixture
def train_file(tmp_path: Path, small_data: dict[str, Path]) -> Path:
    """A private copy of the 64 training rows that a test may rewrite in place."""
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    shutil.copy(small_data["train"], path)
    return path


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def key_for(model_dir: Path, tokenizer, dataset, data_cfg, **kwargs) -> rc.CacheKey:
    return rc.reference_cache_key(ModelConfig(path=str(model_dir)), 7, tokenizer, dataset, data_cfg, **kwargs)


# ----------------------------------------------------------------------------------------------
# Round trip and layout


def test_save_load_round_trip_is_bitwise(tmp_path, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    assert key == key_for(model_copy, tokenizer, dataset, data_cfg)  # deterministic
    json.dumps(key.metadata)  # JSON-able
    ref = fake_reference(dataset)
    cache = tmp_path / "cache"

    assert rc.load_reference_cache(cache, key, dataset) is None  # nothing there yet
    path = rc.save_reference_cache(cache, key, dataset, ref)
    assert path == cache / f"reference-{key.digest}.safetensors"
    loaded = rc.load_reference_cache(cache, key, dataset)

    assert loaded is not None
    assert loaded.chosen.dtype == loaded.rejected.dtype == torch.float32
    assert torch.equal(bits(loaded.chosen), bits(ref.chosen))
    assert torch.equal(bits(loaded.rejected), bits(ref.rejected))

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["fsdpo_reference_cache"])
        assert header["key"]["digest"] == key.metadata["digest"]
        assert f.get_tensor("pair_hashes").shape == (len(dataset), 16)
        assert f.get_tensor("chosen_tokens").tolist() == [len(p.chosen_ids) for p in dataset.pairs]
        assert f.get_tensor("rejected_tokens").tolist() == [len(p.rejected_ids) for p in dataset.pairs]


def test_save_rejects_values_of_another_size(tmp_path, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    with pytest.raises(ValueError, match="do not match"):
        rc.save_reference_cache(tmp_path, key, dataset, ReferenceLogps(torch.zeros(3), torch.zeros(3)))


def with_shared(dataset: PreferenceDataset) -> ReferenceLogps:
    """`fake_reference` with LD-DPO shared-length sums of other awkward values."""
    ref, shared = fake_reference(dataset), fake_reference(dataset, seed=1)
    return ReferenceLogps(ref.chosen, ref.rejected, shared.rejected, shared.chosen)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """A well-formed, correctly checksummed file with these tensors and this header."""
    import safetensors.torch

    metadata = {"fsdpo_reference_cache": json.dumps(header)}
    metadata["checksum"] = rc._checksum(tensors, metadata)
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, json.loads(f.metadata()["fsdpo_reference_cache"])  # noqa: SIM118


def test_shared_length_sums_round_trip_bitwise(tmp_path, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    ref = with_shared(dataset)
    rc.save_reference_cache(tmp_path, key, dataset, ref)
    loaded = rc.load_reference_cache(tmp_path, key, dataset)
    assert loaded.has_shared
    for name in ("chosen", "rejected", "chosen_shared", "rejected_shared"):
        assert torch.equal(bits(getattr(loaded, name)), bits(getattr(ref, name))), name
    assert not loaded.totals().has_shared and torch.equal(bits(loaded.totals().chosen), bits(ref.chosen))
    # without them (a run without loss.ld_alpha) the same key's file has none to give
    rc.save_reference_cache(tmp_path, key, dataset, fake_reference(dataset))
    assert not rc.load_reference_cache(tmp_path, key, dataset).has_shared


def test_half_a_shared_pair_or_an_old_format_is_rejected(tmp_path, model_copy, tokenizer, train_file, capsys):
    """Format 1 (before shared-length sums) is never read: another key, and refused under this one."""
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    assert key.metadata["components"]["code"]["cache_format_version"] == rc.CACHE_FORMAT_VERSION == 2
    path = rc.save_reference_cache(tmp_path, key, dataset, with_shared(dataset))
    tensors, header = _read(path)
    _rewrite(path, {n: t for n, t in tensors.items() if n != "rejected_shared_logps"}, header)
    assert rc.load_reference_cache(tmp_path, key, dataset) is None
    assert "is corrupt (tensors [" in capsys.readouterr().err
    _rewrite(path, {n: t for n, t in tensors.items() if "shared" not in n}, {**header, "format": 1})
    assert rc.load_reference_cache(tmp_path, key, dataset) is None
    assert "written for another key" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# What changes the key


def test_weight_changed_in_place_changes_key(tmp_path, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    cache = tmp_path / "cache"
    old = key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache)
    rc.save_reference_cache(cache, old, dataset, fake_reference(dataset))

    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # flip one byte of the last tensor's data: same size
        f.seek(size - 3)
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0x01]))
    assert weights.stat().st_size == size

    new = key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache)
    assert new.digest != old.digest
    changed = {n for n in digests(old) if digests(old)[n] != digests(new)[n]}
    assert changed == {"model"}
    assert rc.load_reference_cache(cache, new, dataset) is None
    assert rc.load_reference_cache(cache, old, dataset) is not None  # the old file is untouched


def test_model_identity_is_content_not_location(tmp_path, tiny_model_dir, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    original = key_for(tiny_model_dir, tokenizer, dataset, data_cfg)
    copied = key_for(model_copy, build_tokenizer(ModelConfig(path=str(model_copy))), dataset, data_cfg)
    assert copied.digest == original.digest
    names = [f["name"] for f in copied.metadata["components"]["model"]["files"]]
    assert names == ["model.safetensors"]


def test_weight_hash_memo_is_used_and_invalidated(tmp_path, model_copy, tokenizer, train_file, monkeypatch):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    cache = tmp_path / "cache"
    monkeypatch.setattr(rc, "RACY_WINDOW_NS", -(10**12))  # treat the fresh copy as settled
    first = key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache)
    memo = json.loads((cache / rc.MEMO_FILE).read_text())["files"]
    assert os.path.realpath(model_copy / "model.safetensors") in memo

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    real_hash_file = rc.sha256_file
    monkeypatch.setattr(rc, "sha256_file", no_hashing)
    assert key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache).digest == first.digest

    weights = model_copy / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(st.st_size - 3)
        byte = f.read(1)
        f.seek(st.st_size - 3)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # stat differs for certain
    with pytest.raises(AssertionError, match="hashed again"):
        key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache)
    monkeypatch.setattr(rc, "sha256_file", real_hash_file)
    assert key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache).digest != first.digest


def test_freshly_written_weights_are_not_memoised(tmp_path, model_copy, tokenizer, train_file):
    """A file younger than the racy window could be rewritten within one timestamp tick."""
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    cache = tmp_path / "cache"
    weights = model_copy / "model.safetensors"
    os.utime(weights, ns=(0, 10**18))  # an old mtime, but the ctime is now
    key_for(model_copy, tokenizer, dataset, data_cfg, cache_dir=cache)
    memo_path = cache / rc.MEMO_FILE
    memo = json.loads(memo_path.read_text())["files"] if memo_path.exists() else {}
    assert os.path.realpath(weights) not in memo


def test_chat_template_change_changes_key(tmp_path, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    cache = tmp_path / "cache"
    old = key_for(model_copy, tokenizer, dataset, data_cfg)
    rc.save_reference_cache(cache, old, dataset, fake_reference(dataset))

    edited = build_tokenizer(ModelConfig(path=str(model_copy)))
    edited.chat_template = tokenizer.chat_template + "{# v2 #}"  # renders exactly as before
    assert make_dataset(train_file, edited)[0].pairs == dataset.pairs
    new = key_for(model_copy, edited, dataset, data_cfg)

    assert new.digest != old.digest
    changed = {n for n in digests(old) if digests(old)[n] != digests(new)[n]}
    assert changed == {"tokenizer"}
    tokenizer_facts = new.metadata["components"]["tokenizer"]
    assert (
        tokenizer_facts["chat_template_sha256"]
        != old.metadata["components"]["tokenizer"]["chat_template_sha256"]
    )
    assert rc.load_reference_cache(cache, new, dataset) is None


def test_one_changed_pair_changes_key(tmp_path, model_copy, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    cache = tmp_path / "cache"
    old = key_for(model_copy, tokenizer, dataset, data_cfg)
    rc.save_reference_cache(cache, old, dataset, fake_reference(dataset))

    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    content = rows[10]["chosen"][-1]["content"]
    rows[10]["chosen"][-1]["content"] = content[:-1] + ("7" if content[-1] != "7" else "8")
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed_data, _ = make_dataset(train_file, tokenizer)
    changed_pairs = [(a, b) for a, b in zip(dataset.pairs, changed_data.pairs) if a != b]
    assert len(changed_pairs) == 1
    before, after = changed_pairs[0]  # one token id differs; every length is the same
    assert [len(x) for x in pair_content(before)] == [len(x) for x in pair_content(after)]
    new = key_for(model_copy, tokenizer, changed_data, data_cfg)

    assert new.digest != old.digest
    changed = {n for n in digests(old) if digests(old)[n] != digests(new)[n]}
    assert changed == {"data"}
    assert rc.load_reference_cache(cache, new, changed_data) is None


@pytest.mark.parametrize("max_lengths", [(1024, 512), (1024, 40)], ids=["no-pair-truncated", "truncating"])
def test_max_length_changes_key(tmp_path, model_copy, tokenizer, train_file, max_lengths):
    long_data, long_cfg = make_dataset(train_file, tokenizer, max_lengths[0])
    short_data, short_cfg = make_dataset(train_file, tokenizer, max_lengths[1])
    truncating = short_data.pairs != long_data.pairs
    assert truncating == (max_lengths[1] == 40)  # both cases really are what their name says
    cache = tmp_path / "cache"
    old = key_for(model_copy, tokenizer, long_data, long_cfg)
    rc.save_reference_cache(cache, old, long_data, fake_reference(long_data))

    new = key_for(model_copy, tokenizer, short_data, short_cfg)
    assert new.digest != old.digest
    assert new.metadata["components"]["data"]["settings"]["max_length"] == max_lengths[1]
    assert rc.load_reference_cache(cache, new, short_data) is None


def test_seed_adapter_and_extra_enter_the_key(tmp_path, tokenizer, train_file):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    random_init = ModelConfig(path=str(ASSETS / "tiny-llama"), random_init=True)

    def key(seed: int = 1, **kwargs) -> str:
        return rc.reference_cache_key(random_init, seed, tokenizer, dataset, data_cfg, **kwargs).digest

    assert key(1) == key(1)
    assert len({key(1), key(2), key(1, adapter="lora r=8"), key(1, adapter="lora r=16"),
                key(1, extra={"mixed_precision": "bf16"})}) == 5  # fmt: skip
    model = rc.reference_cache_key(random_init, 1, tokenizer, dataset, data_cfg).metadata["components"][
        "model"
    ]
    assert model["random_init"]["seed"] == 1 and "files" not in model


def test_hub_id_resolves_to_local_snapshot(tmp_path, tiny_model_dir, tokenizer, train_file, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--fsdpo-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    dataset, data_cfg = make_dataset(train_file, tokenizer)

    def model_component(path: str) -> dict:
        key = rc.reference_cache_key(ModelConfig(path=path), 7, tokenizer, dataset, data_cfg)
        return key.metadata["components"]["model"]

    from_hub = model_component("fsdpo-test/tiny")
    assert from_hub["source"] == "hub snapshot"
    assert from_hub["digest"] == model_component(str(tiny_model_dir))["digest"]  # same content
    missing = model_component("fsdpo-test/absent")
    assert missing["source"] == "hub id (no local snapshot)"
    assert missing["hub_id"] == "fsdpo-test/absent" and missing["revision"] == "unresolved"
    assert missing["digest"] != model_component("fsdpo-test/other")["digest"]


# ----------------------------------------------------------------------------------------------
# Lookup by pair hash


def test_reordered_rows_keep_the_key_and_map_values_to_their_pairs(
    tmp_path, model_copy, tokenizer, train_file
):
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join([*lines, lines[3]]) + "\n")  # one duplicate pair
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    ref = fake_reference(dataset)
    cache = tmp_path / "cache"
    rc.save_reference_cache(cache, key, dataset, ref)

    order = torch.randperm(len(lines) + 1, generator=torch.Generator().manual_seed(1)).tolist()
    rows = train_file.read_text().splitlines()
    train_file.write_text("\n".join(rows[i] for i in order) + "\n")
    shuffled, _ = make_dataset(train_file, tokenizer)
    assert [pair_content(p) for p in shuffled.pairs] != [pair_content(p) for p in dataset.pairs]

    assert key_for(model_copy, tokenizer, shuffled, data_cfg) == key
    loaded = rc.load_reference_cache(cache, key, shuffled)
    assert loaded is not None
    original_index = {pair_content(p): i for i, p in enumerate(dataset.pairs)}
    expected = torch.tensor([original_index[pair_content(p)] for p in shuffled.pairs])
    assert torch.equal(bits(loaded.chosen), bits(ref.chosen[expected]))
    assert torch.equal(bits(loaded.rejected), bits(ref.rejected[expected]))


# ----------------------------------------------------------------------------------------------
# Corruption, atomicity, coexistence


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    at = min(int(len(data) * where), len(data) - 4)
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    path.write_bytes(bytes(data))


def _flip_tensor(path: Path, name: str) -> None:
    """Flip the sign bit of the first element of tensor `name`: a well-formed file, wrong data."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]
    data[start + 3] ^= 0x80
    path.write_bytes(bytes(data))


def _truncate(path: Path, where: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * where)])


@pytest.mark.parametrize(
    "damage",
    [
        ("flip", 0.02),  # header length / start of the JSON header
        ("flip", 0.25),
        ("flip", 0.5),
        ("flip", 0.75),
        ("flip", 1.0),  # the last value
        ("truncate", 0.5),
        ("truncate", 0.999),
        ("truncate", 0.0),
        ("flip-tensor", "chosen_logps"),
        ("flip-tensor", "rejected_logps"),
    ],
    ids=lambda d: f"{d[0]}-{d[1]}",
)
def test_corrupt_file_warns_and_is_rebuilt(tmp_path, model_copy, tokenizer, train_file, capsys, damage):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    ref = fake_reference(dataset)
    cache = tmp_path / "cache"
    path = rc.save_reference_cache(cache, key, dataset, ref)
    capsys.readouterr()

    kind, where = damage
    {"flip": _flip, "truncate": _truncate, "flip-tensor": _flip_tensor}[kind](path, where)
    assert rc.load_reference_cache(cache, key, dataset) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"fsdpo: warning: reference cache {path} is corrupt (")
    assert err[0].endswith("); rebuilding")

    rc.save_reference_cache(cache, key, dataset, ref)  # the caller's rebuild replaces it
    assert torch.equal(bits(rc.load_reference_cache(cache, key, dataset).chosen), bits(ref.chosen))


def test_file_of_another_key_is_rejected(tmp_path, model_copy, tokenizer, train_file, capsys):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    other = key_for(model_copy, tokenizer, dataset, data_cfg, adapter="lora r=8")
    cache = tmp_path / "cache"
    path = rc.save_reference_cache(cache, key, dataset, fake_reference(dataset))
    shutil.copy(path, cache / other.file_name)  # a renamed file
    assert rc.load_reference_cache(cache, other, dataset) is None
    assert "written for another key" in capsys.readouterr().err


def test_write_is_atomic(tmp_path, model_copy, tokenizer, train_file, monkeypatch):
    dataset, data_cfg = make_dataset(train_file, tokenizer)
    key = key_for(model_copy, tokenizer, dataset, data_cfg)
    cache = tmp_path / "cache"
    first = fake_reference(dataset, seed=1)
    path = rc.save_reference_cache(cache, key, dataset, first)
    assert os.listdir(cache) == [path.name]  # no temp file left behind
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError, match="disk full"):
        rc.save_reference_cache(cache, key, dataset, fake_reference(dataset, seed=2))
    assert os.listdir(cache) == [path.name]  # the temp file is removed
    assert path.read_bytes() == before  # and the old file is intact
    monkeypatch.undo()
    assert torch.equal(bits(rc.load_reference_cache(cache, key, dataset).chosen), bits(first.chosen))


def test_two_keys_coexist(tmp_path, model_copy, tokenizer, train_file):
    long_data, long_cfg = make_dataset(train_file, tokenizer, 1024)
    short_data, short_cfg = make_dataset(train_file, tokenizer, 40)
    long_key = key_for(model_copy, tokenizer, long_data, long_cfg)
    short_key = key_for(model_copy, tokenizer, short_data, short_cfg)
    long_ref, short_ref = fake_reference(long_data, seed=1), fake_reference(short_data, seed=2)
    cache = tmp_path / "cache"
    long_path = rc.save_reference_cache(cache, long_key, long_data, long_ref)
    long_bytes = long_path.read_bytes()
    short_path = rc.save_reference_cache(cache, short_key, short_data, short_ref)

    assert sorted(os.listdir(cache)) == sorted([long_path.name, short_path.name])
    assert long_path.read_bytes() == long_bytes
    assert torch.equal(
        bits(rc.load_reference_cache(cache, long_key, long_data).chosen), bits(long_ref.chosen)
    )
    assert torch.equal(
        bits(rc.load_reference_cache(cache, short_key, short_data).chosen), bits(short_ref.chosen)
    )


# ----------------------------------------------------------------------------------------------
# Speed


def test_keying_2000_pairs_is_fast(tokenizer, tiny_model_dir):
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(2000):
        prompt, chosen, rejected = (
            torch.randint(0, 400, (n,), generator=generator).tolist() for n in (60, 40, 40)
        )
        pairs.append(TokenizedPair(i, prompt, chosen, rejected))
    dataset = PreferenceDataset(pairs)
    data_cfg = DataConfig(train=[DataSource(path="synthetic.jsonl")])
    start = time.perf_counter()
    key = rc.reference_cache_key(ModelConfig(path=str(tiny_model_dir)), 0, tokenizer, dataset, data_cfg)
    assert time.perf_counter() - start < 0.5
    assert key.metadata["components"]["data"]["pairs"] == 2000


def _hash_on_two_ranks(rank: int, store_path: str, files: list[str], out: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # forked from a test process that has its own one-rank group
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    if rank == 1:  # rank 1 must not read a byte of the weights
        rc.sha256_file = lambda path: (_ for _ in ()).throw(AssertionError(f"rank 1 hashed {path}"))
    digests = rc.hash_files_on_rank_zero([Path(f) for f in files])
    Path(out, f"rank-{rank}.json").write_text(json.dumps(digests))
    dist.destroy_process_group()


def test_weight_files_are_hashed_by_rank_zero_only_and_broadcast(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    files = []
    for i in range(3):
        files.append(str(tmp_path / f"w{i}.safetensors"))
        Path(files[-1]).write_bytes(bytes([i]) * (1000 + i))
    args = (str(tmp_path / "store"), files, str(tmp_path))
    mp.start_processes(_hash_on_two_ranks, args=args, nprocs=2, join=True, start_method="fork")
    expected = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == expected
