"""Assembling a data set from tokenised sources: filters, length policy, mixing, statistics.

Per source, in this order (each step counted in `stats["sources"][i]["filters"]`):
1. `bad_row`: malformed rows (formats.py, tokenize.py) stop the run under `data.on_bad_row =
   "error"` (naming source, row and problem) or are dropped under `"skip"`. Template mismatches
   always stop it (tokenize.py says why).
2. `empty_completion`: a completion that is empty or only whitespace.
3. `identical`: chosen and rejected are the same.
4. length policy (`data.max_length`, `data.max_prompt_length`, `data.truncation`):
   - `keep_start`: a prompt over `max_prompt_length` keeps its last tokens (the latest turns and
     the generation prompt, which the completion depends on most; a leading BOS is cut with the
     rest); completions are cut from the end to fit `max_length` (a cut completion has no EOS).
     Pairs whose prompt leaves no room for a completion token are dropped (`no_trainable_token`),
     as are pairs whose cut completions became identical (`identical_after_truncation`).
   - `drop`: pairs over either limit are dropped (`too_long`).
5. sampling: `count` pairs, or `fraction` x the pairs left, seeded; whole repeats, then a sample
   without replacement for the remainder.

Pairs are numbered by position (`pair_id`) after mixing, before any shuffling; the reference
log-probs are indexed by it. Token ids stay in the memory-mapped cache and are read per pair on
access (`pairs[i]`), so a large mixture costs no Python lists per rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from engine.config import DataConfig, DataSource
from engine.data import tokenize
from engine.data.cache import (
    TokenizedSource,
    default_cache_dir,
    ensure_tokenized,
    is_cached,
    load_cached,
    run_on_rank0_first,
)
from engine.data.sources import resolve_source
from engine.errors import UserError

MAX_EXAMPLES = 5  # bad-row problems quoted per source in the statistics


@dataclass
class TokenizedPair:
    """A pair; for unpaired losses an example (`unpaired_examples`): chosen is its completion,
    rejected its KL completion, `desirable` its label."""

    pair_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    desirable: bool | None = None  # None: a preference pair


class _TokenColumn:
    """Zero-copy numpy views of a list<int32> Arrow column, chunk by chunk."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.parts = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in column.chunks]
        self.starts = np.cumsum([0] + [len(off) - 1 for off, _ in self.parts])
        self.lengths = (
            np.concatenate([np.diff(off) for off, _ in self.parts]).astype(np.int64)
            if self.parts
            else np.zeros(0, np.int64)
        )

    def ids(self, row: int, start: int, stop: int) -> list[int]:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        offsets, values = self.parts[k]
        begin = int(offsets[row - self.starts[k]])
        return values[begin + start : begin + stop].tolist()


_SIDES = ("chosen", "rejected")


class ArrowPairs(Sequence):
    """Pairs read on access from tokenised Arrow rows, with their truncation applied.

    Pair i is row `rows[i]` of the tables: prompt tokens [prompt_start, prompt_start + prompt_len),
    the first `chosen_len` chosen and `rejected_len` rejected tokens. Unpaired examples
    (`unpaired_examples`) also have `side` (their completion is row `rows[i]`'s chosen (0) or
    rejected (1) column), `kl_rows` and `kl_side` (where their KL completion is) and `desirable`.
    """

    def __init__(self, columns: dict[str, _TokenColumn], spans: dict[str, np.ndarray]) -> None:
        self.columns, self.spans = columns, spans

    @property
    def rows(self) -> np.ndarray:
        return self.spans["rows"]

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenizedPair]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, row = self.spans, int(self.rows[i])
        start = int(s["prompt_start"][i])
        prompt = self.columns["prompt"].ids(row, start, start + int(s["prompt_len"][i]))
        if "side" not in s:
            return TokenizedPair(
                i,
                prompt,
                self.columns["chosen"].ids(row, 0, int(s["chosen_len"][i])),
                self.columns["rejected"].ids(row, 0, int(s["rejected_len"][i])),
            )
        return TokenizedPair(
            i,
            prompt,
            self.columns[_SIDES[s["side"][i]]].ids(row, 0, int(s["chosen_len"][i])),
            self.columns[_SIDES[s["kl_side"][i]]].ids(int(s["kl_rows"][i]), 0, int(s["rejected_len"][i])),
            bool(s["desirable"][i]),
        )

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def lengths(self) -> np.ndarray:
        s = self.spans
        return np.stack([s["prompt_len"], s["chosen_len"], s["rejected_len"]], axis=1).astype(np.int64)

    def select(self, positions: np.ndarray) -> ArrowPairs:
        return ArrowPairs(self.columns, {k: v[positions] for k, v in self.spans.items()})


@dataclass
class PreferenceDataset:
    """Tokenised pairs (a list, or ArrowPairs read from the cache) and their statistics."""

    pairs: Sequence[TokenizedPair]
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def lengths(self) -> np.ndarray:
        """[N, 3] int64: prompt, chosen and rejected tokens of each pair."""
        if isinstance(self.pairs, ArrowPairs):
            return self.pairs.lengths()
        return np.array(
            [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in self.pairs], np.int64
        ).reshape(-1, 3)

    def sequence_lengths(self) -> np.ndarray:
        """[N]: prompt + the longer completion, the padded width a pair needs."""
        lengths = self.lengths()
        return lengths[:, 0] + lengths[:, 1:].max(axis=1)

    def rows(self) -> np.ndarray:
        """The underlying row of each pair (repeats of an up-sampled row share it)."""
        return self.pairs.rows if isinstance(self.pairs, ArrowPairs) else np.arange(len(self.pairs))

    def summary(self) -> str:
        """One log line: pairs (unpaired data: examples, desirable and undesirable), what the
        filters dropped, and token-length percentiles."""
        unpaired = self.stats.get("unpaired")
        if unpaired:
            labels = f"{unpaired['desirable']} desirable, {unpaired['undesirable']} undesirable"
            parts = [f"{len(self)} examples ({labels})"]
        else:
            parts = [f"{len(self)} pairs"]
        for source in self.stats.get("sources", []):
            dropped = ", ".join(f"{k} {v['dropped']}" for k, v in source["filters"].items() if v["dropped"])
            cut = ", ".join(f"{k} {v}" for k, v in source["truncated"].items() if v)
            parts.append(
                f"{source['source']}: {source['rows']} rows -> {source['kept']} kept -> {source['sampled']} "
                f"sampled (dropped: {dropped or 'none'}; truncated: {cut or 'none'})"
            )
        tokens = self.stats.get("tokens", {})
        if tokens.get("sequence"):
            parts.append(
                "tokens p50/p99/max: "
                + ", ".join(f"{k} {v['p50']}/{v['p99']}/{v['max']}" for k, v in tokens.items() if v)
            )
        return "; ".join(parts)

    def select(self, positions: np.ndarray) -> PreferenceDataset:
        """The pairs at `positions`, renumbered from 0, with length statistics."""
        positions = np.asarray(positions, dtype=np.int64)
        if isinstance(self.pairs, ArrowPairs):
            pairs: Sequence[TokenizedPair] = self.pairs.select(positions)
        else:
            pairs = [
                dataclasses.replace(p, pair_id=i)
                for i, p in enumerate(self.pairs[k] for k in positions.tolist())
            ]
        selected = PreferenceDataset(pairs)
        selected.stats = {"pairs": len(selected), "tokens": token_stats(selected.lengths())}
        return selected


# ----------------------------------------------------------------------------------------------
# Statistics


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="nearest").tolist()
    return {
        "mean": round(float(values.mean()), 1),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": int(values.max()),
    }


def token_stats(lengths: np.ndarray) -> dict[str, dict[str, float]]:
    """Token-length percentiles of prompts, completions and the padded sequence of each pair."""
    return {
        "prompt": _percentiles(lengths[:, 0]),
        "chosen": _percentiles(lengths[:, 1]),
        "rejected": _percentiles(lengths[:, 2]),
        "sequence": _percentiles(lengths[:, 0] + lengths[:, 1:].max(axis=1)) if len(lengths) else {},
    }


# ----------------------------------------------------------------------------------------------
# Filters, length policy and sampling for one source


def _first_row_with(status: pa.ChunkedArray, value: str) -> int | None:
    hits = np.flatnonzero(pc.equal(status, value).to_numpy(zero_copy_only=False))
    return int(hits[0]) if len(hits) else None


def filter_source(source: TokenizedSource, cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Spans of the pairs this source keeps (rows local to the source), and its statistics."""
    table = source.table
    status = table.column("status")
    fatal = _first_row_with(status, tokenize.TEMPLATE)
    if fatal is not None:
        problem = table.column("problem")[fatal].as_py()
        raise UserError(f"{source.name}: {source.location(fatal)}: {problem}")
    codes = status.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(codes == tokenize.BAD_ROW)
    if len(bad) and cfg.on_bad_row == "error":
        problem = table.column("problem")[int(bad[0])].as_py()
        raise UserError(
            f"{source.name}: {source.location(int(bad[0]))}: {problem} "
            '(data.on_bad_row = "skip" drops such rows)'
        )
    filters: dict[str, dict[str, int]] = {}
    left = table.num_rows

    def count(name: str, dropped: int) -> None:
        nonlocal left
        left -= dropped
        filters[name] = {"dropped": dropped, "left": left}

    count("bad_row", len(bad))
    count("empty_completion", int((codes == tokenize.EMPTY).sum()))
    count("identical", int((codes == tokenize.IDENTICAL).sum()))

    ok = np.flatnonzero(codes == tokenize.OK)
    prompt = _TokenColumn(table.column("prompt_ids")).lengths[ok]
    chosen = _TokenColumn(table.column("chosen_ids")).lengths[ok]
    rejected = _TokenColumn(table.column("rejected_ids")).lengths[ok]
    common = table.column("common_prefix").to_numpy()[ok].astype(np.int64)
    max_prompt = cfg.max_prompt_length or cfg.max_length
    truncated = {"prompt": 0, "completion": 0}
    if cfg.truncation == "drop":
        keep = (prompt <= max_prompt) & (prompt + np.maximum(chosen, rejected) <= cfg.max_length)
        count("too_long", int((~keep).sum()))
        prompt_start = np.zeros_like(prompt)
    else:
        prompt_start = np.maximum(prompt - max_prompt, 0) if cfg.max_prompt_length else np.zeros_like(prompt)
        prompt = prompt - prompt_start
        room = cfg.max_length - prompt
        keep = room >= 1
        count("no_trainable_token", int((~keep).sum()))
        cut_chosen, cut_rejected = np.minimum(chosen, room), np.minimum(rejected, room)
        same = keep & (cut_chosen == cut_rejected) & (common >= cut_chosen)
        count("identical_after_truncation", int(same.sum()))
        keep &= ~same
        truncated["prompt"] = int((keep & (prompt_start > 0)).sum())
        truncated["completion"] = int((keep & ((cut_chosen < chosen) | (cut_rejected < rejected))).sum())
        chosen, rejected = cut_chosen, cut_rejected
    spans = {
        "rows": ok[keep],
        "prompt_start": prompt_start[keep],
        "prompt_len": prompt[keep],
        "chosen_len": chosen[keep],
        "rejected_len": rejected[keep],
    }
    stats: dict[str, Any] = {
        "source": source.name,
        "rows": table.num_rows,
        "filters": filters,
        "truncated": truncated,
        "kept": int(keep.sum()),
    }
    if len(bad):
        stats["bad_row_examples"] = [
            f"{source.location(int(r))}: {table.column('problem')[int(r)].as_py()}"
            for r in bad[:MAX_EXAMPLES]
        ]
    return spans, stats


def _sample(kept: int, source: DataSource, place: str, seed: int) -> np.ndarray:
    """Positions (into the kept pairs) of the seeded `count` / `fraction` sample; `place` is the
    source's key in the recipe ("data.train[0]")."""
    target = source.count if source.count > 0 else round(source.fraction * kept)
    repeats, rest = divmod(target, kept)
    digest = hashlib.sha256(f"{seed}:{place}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    extra = np.sort(rng.choice(kept, size=rest, replace=False)) if rest else np.zeros(0, np.int64)
    return np.concatenate([np.tile(np.arange(kept), repeats), extra]).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Building


def build_dataset(
    sources: list[DataSource],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    seed: int,
    *,
    name: str | None = None,
    unpaired: bool = False,
) -> PreferenceDataset:
    """Load, tokenise (or reuse the cache), filter, truncate and mix `sources`.

    `name` prefixes messages ("data.train", "data.eval"; by default whichever list of `cfg`
    `sources` is). `unpaired`: the data is for an unpaired loss (`check_pairing`); its examples
    are made by `unpaired_examples`. Under torch.distributed every rank must call this, in the
    same order.
    """
    key = name or ("data.eval" if sources is cfg.eval else "data.train")
    if not sources:
        raise UserError(f"{key}: no sources")
    names = [f"{key}[{i}] ({s.path})" for i, s in enumerate(sources)]
    template = tokenize.resolve_chat_template(cfg.chat_template)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"data.cache_dir: {cache_dir} is not a folder")

    def build() -> list[str]:
        resolved = [resolve_source(s, n) for s, n in zip(sources, names)]
        return ensure_tokenized(
            resolved, tokenizer, template, cfg.format, cfg.columns, cache_dir, cfg.num_proc
        )

    folders = run_on_rank0_first(build, lambda fs: all(is_cached(cache_dir / f) for f in fs))
    tokenized = []
    for folder, source_name in zip(folders, names):
        loaded = load_cached(cache_dir / folder, source_name)
        if loaded is None:
            raise RuntimeError(f"{source_name}: the tokenised data in {cache_dir / folder} cannot be read")
        tokenized.append(loaded)

    spans, per_source, offset = [], [], 0
    for i, (source, config, source_name) in enumerate(zip(tokenized, sources, names)):
        kept, stats = filter_source(source, cfg)
        check_kept(stats, source_name)
        check_pairing(source, kept, cfg, unpaired)
        # seeded by the source's place in the recipe, not its path: the same recipe samples the
        # same pairs wherever the data lives (another node's mount, a moved folder)
        picked = _sample(stats["kept"], config, f"{key}[{i}]", seed)
        examples = stats.pop("bad_row_examples", None)
        stats["sampled"] = len(picked)
        if examples:
            stats["bad_row_examples"] = examples
        spans.append({k: v[picked] + (offset if k == "rows" else 0) for k, v in kept.items()})
        per_source.append(stats)
        offset += source.table.num_rows

    table = pa.concat_tables([s.table for s in tokenized])
    columns = {side: _TokenColumn(table.column(f"{side}_ids")) for side in ("prompt", "chosen", "rejected")}
    pairs = ArrowPairs(columns, {k: np.concatenate([s[k] for s in spans]) for k in spans[0]})
    dataset = PreferenceDataset(pairs)
    dataset.stats = {
        "pairs": len(pairs),
        "sources": per_source,
        "tokens": token_stats(pairs.lengths()),
        "settings": {
            "format": cfg.format,
            "max_length": cfg.max_length,
            "max_prompt_length": cfg.max_prompt_length,
            "truncation": cfg.truncation,
            "on_bad_row": cfg.on_bad_row,
        },
    }
    return dataset


def check_pairing(
    source: TokenizedSource, kept: dict[str, np.ndarray], cfg: DataConfig, unpaired: bool
) -> None:
    """A UserError naming the first row of `source` (`filter_source`'s `kept` spans) that its
    loss cannot take: an unpaired example (one completion and a label) for a paired loss, a
    preference pair for an unpaired loss unless `data.unpair` splits it."""
    one_sided = (kept["chosen_len"] == 0) | (kept["rejected_len"] == 0)
    wrong = np.flatnonzero(~one_sided if unpaired else one_sided)
    if not len(wrong) or (unpaired and cfg.unpair):
        return
    where = f"{source.name}: {source.location(int(kept['rows'][wrong[0]]))}"
    if unpaired:
        raise UserError(
            f"{where}: a preference pair (chosen and rejected) for an unpaired loss in loss.type: set "
            "data.unpair = true to split each pair into a desirable and an undesirable example, or give "
            "unpaired rows {prompt, completion, label}"
        )
    raise UserError(
        f"{where}: an unpaired example (completion and label) for a paired loss in loss.type: unpaired "
        'rows need an unpaired loss such as "kto"'
    )


def kl_partners(count: int, chunk: int, seed: int) -> np.ndarray:
    """The example whose completion each of `count` examples' KL sequence takes
    (`data.kl_shift_chunk`): chunk 0, a seeded random cycle through all of them (never itself, for
    count >= 2); chunk k > 0, TRL 1.16's +1 shift within consecutive chunks of k (example s + j
    takes s + j - 1, the chunk's first its last; a chunk of one takes itself, as in TRL)."""
    positions = np.arange(count)
    if chunk:
        start = positions - positions % chunk
        last = np.minimum(start + chunk, count) - 1
        return np.where(positions == start, last, positions - 1)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:kl".encode()).digest()[:8], "little"))
    cycle = rng.permutation(count)
    partners = np.empty(count, dtype=np.int64)
    partners[cycle] = np.roll(cycle, 1)
    return partners


def unpaired_examples(
    dataset: PreferenceDataset, cfg: DataConfig, seed: int, name: str, *, kl: bool = True
) -> PreferenceDataset:
    """The unpaired examples of `dataset` (`build_dataset(..., unpaired=True)`, after any eval
    split), numbered from 0, each a `TokenizedPair` of its prompt, its completion (chosen), the
    completion of its `kl_partners` example (rejected: the KL sequence), and `desirable`. A
    preference pair gives two examples with `data.unpair`, (prompt, chosen, desirable) then
    (prompt, rejected, undesirable). A KL completion is cut to fit `data.max_length` after the
    example's prompt (TRL cuts the KL sequence at max_length too). Being a pure function of the
    data set, `data.kl_shift_chunk` and `seed`, the pairing does not depend on batching, world
    size or resume, and the reference log-probs of the KL sequences are cached with the rest.
    `kl` False (a loss without a KL term, `losses.kl_sequences`): no KL sequences, the rejected
    side is empty."""
    pairs = dataset.pairs
    if not isinstance(pairs, ArrowPairs):
        raise TypeError("unpaired_examples needs a data set read from the tokenisation cache")
    s = pairs.spans
    has = np.stack([s["chosen_len"] > 0, s["rejected_len"] > 0], axis=1)
    pair, side = np.nonzero(has)  # pair order, the chosen side first
    if kl and len(pair) < 2:
        raise UserError(f"{name}: {len(pair)} unpaired example; the KL estimate needs at least 2")
    completion = np.where(side == 0, s["chosen_len"][pair], s["rejected_len"][pair])
    partner = kl_partners(len(pair), cfg.kl_shift_chunk, seed) if kl else np.arange(len(pair))
    spans = {key: s[key][pair] for key in ("rows", "prompt_start", "prompt_len")}
    spans |= {
        "side": side.astype(np.int8),
        "chosen_len": completion,
        "kl_rows": spans["rows"][partner],
        "kl_side": side[partner].astype(np.int8),
        "rejected_len": np.minimum(completion[partner], cfg.max_length - spans["prompt_len"]) * kl,
        "desirable": side == 0,
    }
    examples = PreferenceDataset(ArrowPairs(pairs.columns, spans))
    desirable = int(spans["desirable"].sum())
    examples.stats = {
        **dataset.stats,
        "pairs": len(examples),
        "tokens": token_stats(examples.lengths()),
        "unpaired": {
            "desirable": desirable,
            "undesirable": len(pair) - desirable,
            **({"kl_shift_chunk": cfg.kl_shift_chunk} if kl else {"kl_sequences": False}),
        },
    }
    return examples


def check_kept(stats: dict[str, Any], name: str) -> None:
    """A source must keep at least one pair after filtering (`filter_source`'s statistics)."""
    if stats["kept"] == 0:
        raise UserError(f"{name}: no pair left after filtering ({_funnel(stats)})")


def _funnel(stats: dict[str, Any]) -> str:
    dropped = ", ".join(f"{k}: {v['dropped']}" for k, v in stats["filters"].items() if v["dropped"])
    return f"{stats['rows']} rows; dropped {dropped or 'none'}"


def split_eval(
    dataset: PreferenceDataset, fraction: float, seed: int
) -> tuple[PreferenceDataset, PreferenceDataset]:
    """Hold out `fraction` of the underlying rows as an eval set: (train, eval), seeded.

    Split by row, not by pair, so an up-sampled row's repeats all stay on one side; the eval set
    holds each of its rows once. Both are renumbered from 0 (pair ids index their own reference
    log-probs). The train set keeps the source statistics, with `eval_held_out` added.
    """
    rows = dataset.rows()
    unique = np.unique(rows)
    n_eval = round(fraction * len(unique))
    if not 1 <= n_eval < len(unique):
        raise UserError(
            f"data.eval_fraction={fraction}: holds out {n_eval} of {len(unique)} training rows; "
            "it must leave at least one on each side"
        )
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(f"{seed}:eval".encode()).digest()[:8], "little")
    )
    held_out = np.zeros(int(rows.max()) + 1, dtype=bool)
    held_out[rng.choice(unique, size=n_eval, replace=False)] = True
    in_eval = held_out[rows]
    first = np.zeros(len(rows), dtype=bool)
    first[np.unique(rows, return_index=True)[1]] = True
    train = dataset.select(np.flatnonzero(~in_eval))
    evaluation = dataset.select(np.flatnonzero(in_eval & first))
    train.stats = {
        **dataset.stats,
        "pairs": len(train),
        "tokens": train.stats["tokens"],
        "eval_held_out": {"fraction": fraction, "rows": n_eval, "pairs_removed": int(in_eval.sum())},
    }
    evaluation.stats["held_out_from"] = "train"
    return train, evaluation
