"""Preference data: load, normalise, template, tokenise, truncate, sample, collate.

A pair becomes three token lists: the prompt (rendered once, with the chat template's generation
prompt for conversational data) and the chosen and rejected completions (the tokens that follow
the prompt in the full conversation's rendering, closed by EOS). Only completion tokens are
scored. Pairs get a stable id (their position after loading and mixing, before any shuffling),
which the reference log-probs are indexed by.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from engine.config import DataConfig, DataSource
from engine.errors import UserError

Messages = list[dict[str, str]]


@dataclass
class TokenizedPair:
    pair_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class PreferenceDataset:
    pairs: list[TokenizedPair]
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class PairBatch:
    """A micro-batch of pairs as token lists; forward modes turn it into model inputs."""

    pair_ids: torch.Tensor  # [B] long: index into the dataset (and the reference log-probs)
    valid: torch.Tensor  # [B] bool: False for padding pairs that only keep ranks in step
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def real_tokens(self) -> int:
        """Tokens of both sequences of every valid pair (what a padding-free forward reads)."""
        return sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r, ok in zip(self.prompts, self.chosen, self.rejected, self.valid.tolist())
            if ok
        )


# ----------------------------------------------------------------------------------------------
# Loading and normalising rows


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a local .json (an array, or JSON lines) or .jsonl file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{path}: data file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    elif p.suffix in (".json", ".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n + 1} is not valid JSON ({e.msg})") from None
    else:
        raise UserError(f"{path}: expected a .json or .jsonl file")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _check_messages(messages: Any, where: str, column: str) -> Messages:
    if not _is_messages(messages) or not messages:
        raise UserError(f"{where}: {column}: expected a non-empty list of messages")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {column}: each message needs string `role` and `content`")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise UserError(f"{where}: {column}: unknown role {m['role']!r}")
    return messages


def _split_final_assistant(conversation: Messages, where: str, column: str) -> tuple[Messages, Messages]:
    if conversation[-1]["role"] != "assistant":
        raise UserError(f"{where}: {column}: the conversation must end with an assistant turn")
    return conversation[:-1], conversation[-1:]


def normalise_row(row: dict[str, Any], where: str) -> tuple[str | Messages, Any, Any]:
    """(prompt, chosen, rejected): prompt a string or messages; completions likewise.

    Standard rows hold strings. Conversational rows hold message lists: an explicit `prompt`
    with one-assistant-turn completions, or (no `prompt`) whole conversations whose shared part
    before the final assistant turn is the prompt.
    """
    for column in ("chosen", "rejected"):
        if column not in row:
            raise UserError(f"{where}: missing column {column!r}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise UserError(f"{where}: prompt: expected a string for string completions")
        return prompt, chosen, rejected
    chosen = _check_messages(chosen, where, "chosen")
    rejected = _check_messages(rejected, where, "rejected")
    if prompt is None:
        prompt, chosen = _split_final_assistant(chosen, where, "chosen")
        rejected_prompt, rejected = _split_final_assistant(rejected, where, "rejected")
        if rejected_prompt != prompt:
            raise UserError(f"{where}: chosen and rejected differ before the final assistant turn")
        if not prompt:
            raise UserError(f"{where}: chosen and rejected share no prompt")
    else:
        prompt = _check_messages(prompt, where, "prompt")
    for column, completion in (("chosen", chosen), ("rejected", rejected)):
        if [m["role"] for m in completion] != ["assistant"]:
            raise UserError(f"{where}: {column}: expected exactly one assistant message")
    return prompt, chosen, rejected


# ----------------------------------------------------------------------------------------------
# Tokenising


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _close_with_eos(completion: list[int], eos_id: int) -> list[int]:
    """End the completion at its last EOS (dropping template whitespace after it), or add one."""
    if eos_id in completion:
        last = len(completion) - 1 - completion[::-1].index(eos_id)
        return completion[: last + 1]
    return [*completion, eos_id]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, chosen: Any, rejected: Any, where: str
) -> tuple[list[int], list[int], list[int]]:
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        prompt_ids = _ids(tokenizer, prompt, special=True)
        completions = [[*_ids(tokenizer, c, special=False), eos] for c in (chosen, rejected)]
        return prompt_ids, *completions  # type: ignore[return-value]
    if tokenizer.chat_template is None:
        raise UserError(f"{where}: conversational data needs a tokenizer with a chat_template")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = _ids(tokenizer, prompt_text, special=False)
    completions = []
    for column, completion in (("chosen", chosen), ("rejected", rejected)):
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        full_ids = _ids(tokenizer, full_text, special=False)
        if not full_text.startswith(prompt_text) or full_ids[: len(prompt_ids)] != prompt_ids:
            raise UserError(
                f"{where}: {column}: the chat template's rendering of the prompt is not a prefix "
                "of the full conversation's rendering, so the completion cannot be split off"
            )
        completions.append(_close_with_eos(full_ids[len(prompt_ids) :], eos))
    return prompt_ids, completions[0], completions[1]


# ----------------------------------------------------------------------------------------------
# Building a data set from sources


def _sample(rows: list[Any], source: DataSource, seed: int) -> list[Any]:
    """Seeded sub- or up-sampling of one source by `count` or `fraction`."""
    target = source.count if source.count > 0 else round(source.fraction * len(rows))
    if target == len(rows):
        return rows
    rng = random.Random(f"{seed}:{source.path}")
    repeats, rest = divmod(target, len(rows))
    return rows * repeats + rng.sample(rows, rest)


def build_dataset(
    sources: list[DataSource], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, seed: int
) -> PreferenceDataset:
    pairs: list[TokenizedPair] = []
    per_source = []
    for source in sources:
        rows = read_rows(source.path)
        if not rows:
            raise UserError(f"{source.path}: no rows")
        rows = _sample(list(enumerate(rows)), source, seed)
        dropped_too_long = 0
        for index, row in rows:
            where = f"{source.path}: row {index}"
            prompt_ids, chosen_ids, rejected_ids = tokenize_pair(tokenizer, *normalise_row(row, where), where)
            room = cfg.max_length - len(prompt_ids)
            if room < 1:
                dropped_too_long += 1
                continue
            pairs.append(TokenizedPair(len(pairs), prompt_ids, chosen_ids[:room], rejected_ids[:room]))
        per_source.append(
            {"path": source.path, "pairs": len(rows), "dropped_no_completion_left": dropped_too_long}
        )
    if not pairs:
        raise UserError(f"data: no pair of {[s.path for s in sources]} fits data.max_length={cfg.max_length}")
    return PreferenceDataset(pairs, {"sources": per_source, "pairs": len(pairs)})


# ----------------------------------------------------------------------------------------------
# Sampling and collating


class GlobalBatchSampler:
    """Which pairs each rank reads at each optimizer step.

    Every step takes the next `global_batch_size` pairs of a seeded per-epoch permutation; rank r
    reads its contiguous slice of them, split into micro-batches. The mapping is a pure function
    of the step, so the data position is just `step x global_batch_size` consumed pairs, the same
    for any world size, and the set of pairs in a step does not depend on how it is split.
    """

    def __init__(
        self,
        num_pairs: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        per_rank, rem = divmod(global_batch_size, world_size)
        if rem or per_rank % micro_batch_size:
            raise UserError(
                f"training.global_batch_size={global_batch_size} must be a multiple of "
                f"training.micro_batch_size={micro_batch_size} x {world_size} ranks"
            )
        if num_pairs < global_batch_size:
            raise UserError(
                f"training.global_batch_size={global_batch_size} is larger than the "
                f"{num_pairs} training pairs"
            )
        self.num_pairs, self.global_batch_size = num_pairs, global_batch_size
        self.micro_batch_size, self.rank, self.seed = micro_batch_size, rank, seed
        self.per_rank = per_rank
        self.accumulation_steps = per_rank // micro_batch_size
        self.steps_per_epoch = num_pairs // global_batch_size
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_pairs, generator=generator)
        return self._order

    def micro_batches(self, step: int) -> list[list[int]]:
        order = self._permutation(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch_size + self.rank * self.per_rank
        mine = order[start : start + self.per_rank].tolist()
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, len(mine), m)]


def shard_for_inference(
    num_pairs: int, batch_size: int, rank: int, world_size: int
) -> list[tuple[list[int], list[bool]]]:
    """This rank's disjoint share of all pairs (r, r+W, ...) in batches of `batch_size`.

    Every rank gets the same number of batches (FSDP's collectives need ranks in step), so the
    shorter shares are padded with repeats of pair 0 marked invalid.
    """
    mine = list(range(rank, num_pairs, world_size))
    per_rank = -(-num_pairs // world_size)
    num_batches = -(-per_rank // batch_size)
    valid = [True] * len(mine) + [False] * (num_batches * batch_size - len(mine))
    mine += [0] * (len(valid) - len(mine))
    return [(mine[i : i + batch_size], valid[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


def collate(dataset: PreferenceDataset, indices: list[int], valid: list[bool] | None = None) -> PairBatch:
    pairs = [dataset.pairs[i] for i in indices]
    return PairBatch(
        pair_ids=torch.tensor([p.pair_id for p in pairs], dtype=torch.long),
        valid=torch.tensor(valid if valid is not None else [True] * len(pairs), dtype=torch.bool),
        prompts=[p.prompt_ids for p in pairs],
        chosen=[p.chosen_ids for p in pairs],
        rejected=[p.rejected_ids for p in pairs],
    )
