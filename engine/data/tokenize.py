"""Tokenising pairs: the prompt once, each completion as what follows it in the conversation.

Standard (string) pairs: the prompt is tokenised with the tokenizer's special tokens (e.g. BOS),
each completion on its own and closed by EOS; as text, prompt + completion is the concatenation.

Conversational pairs: the prompt is rendered by the chat template with the generation prompt
(what the model sees at inference) and tokenised once. Each whole conversation (prompt + the
final assistant turn) is rendered and tokenised, and the completion is the tokens after the
prompt's, up to and including the last EOS (template text after it, such as a newline, is not
trained; an EOS is appended when the template writes none). So prompt + completion is exactly
the tokenisation of the conversation's rendering, and only the final assistant turn is trained.
When that split is impossible the row is not guessed at:

- the rendered prompt is not a text prefix of the rendered conversation (the template renders
  the generation prompt or earlier turns differently): a hard error naming the row, whatever
  `data.on_bad_row` says, because it is a template problem that affects every row like it;
- the texts agree but the tokens do not (the completion's first characters merge with the end
  of the prompt into one token, e.g. a completion starting with a newline after "assistant\\n"):
  a bad row, reported or skipped under `data.on_bad_row`.

Rows are tokenised independently of length settings (the cache keeps untruncated ids; the length
policy is applied when the data set is assembled), so `tokenize_rows` output depends only on the
row, the tokenizer, the template and the format.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from engine.data.formats import COLUMNS, BadRow, Pair, normalise_row
from engine.errors import UserError
from engine.hashing import canonical_json

OK, BAD_ROW, TEMPLATE, EMPTY, IDENTICAL = "", "bad_row", "template", "empty_completion", "identical"
# keys of tokenizer_config.json that say where it was loaded from, not what it does
_LOAD_CONTEXT = ("name_or_path", "is_local", "local_files_only", "_commit_hash", "cache_dir")


def resolve_chat_template(value: str) -> str | None:
    """`data.chat_template` as template text: itself if it looks like Jinja, else a file's text."""
    if not value:
        return None
    if "{{" in value or "{%" in value:
        template = value
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"data.chat_template: {value} is neither a Jinja template nor a file")
        template = path.read_text(encoding="utf-8")
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(
            f"data.chat_template: not a valid Jinja template (line {e.lineno}: {e.message})"
        ) from None
    return template


def tokenizer_file_digests(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """sha256 of each file `save_pretrained` writes (vocabulary, merges, normaliser, special
    tokens, chat template, settings), which covers every tokenizer class. JSON settings files are
    canonicalised and stripped of where-it-was-loaded-from keys, so the same tokenizer loaded
    from two places agrees."""
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fsdpo-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.suffix == ".json" and path.name != "tokenizer.json":
                settings = {k: v for k, v in json.loads(data).items() if k not in _LOAD_CONTEXT}
                data = canonical_json(settings).encode()
            files[path.relative_to(tmp).as_posix()] = hashlib.sha256(data).hexdigest()
    return files


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """One sha256 over the tokenizer's class and `tokenizer_file_digests`."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    for name, file_digest in tokenizer_file_digests(tokenizer).items():
        digest.update(name.encode() + b"\0" + bytes.fromhex(file_digest))
    return digest.hexdigest()


def _close_with_eos(completion: list[int], eos_id: int) -> list[int]:
    """End at the last EOS (dropping template text after it), or append one."""
    if eos_id in completion:
        last = len(completion) - 1 - completion[::-1].index(eos_id)
        return completion[: last + 1]
    return [*completion, eos_id]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _read_row(batch: Mapping[str, list], i: int) -> dict[str, Any]:
    if "__json" not in batch:
        return {name: values[i] for name, values in batch.items()}
    try:
        row = json.loads(batch["__json"][i])
    except json.JSONDecodeError as e:
        raise BadRow(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    return row


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list, template: str | None, generation: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, chat_template=template
        )
    except jinja2.TemplateError as e:
        raise BadRow(f"the chat template rejected the conversation ({e})") from None


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_rows(
    batch: Mapping[str, list],
    indices: list[int],
    *,
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None,
    fmt: str,
    columns: Mapping[str, str],
) -> dict[str, list]:
    """A `datasets.map` batch of raw rows -> untruncated token ids and a status per row.

    Output columns: `prompt_ids`, `chosen_ids`, `rejected_ids` (empty unless the status is OK),
    `common_prefix` (leading tokens chosen and rejected share), `status` (OK, BAD_ROW, TEMPLATE,
    EMPTY, IDENTICAL), `problem` (what is wrong, for BAD_ROW and TEMPLATE) and `line` (the JSON
    line number, -1 where there is none).
    """
    n = len(indices)
    out: dict[str, list] = {
        "prompt_ids": [[] for _ in range(n)],
        "chosen_ids": [[] for _ in range(n)],
        "rejected_ids": [[] for _ in range(n)],
        "common_prefix": [0] * n,
        "status": [OK] * n,
        "problem": [""] * n,
        "line": list(batch["__line"]) if "__line" in batch else [-1] * n,
    }
    names = {c: columns.get(c, c) for c in COLUMNS}
    has_template = chat_template is not None or tokenizer.chat_template is not None
    # texts to tokenise in one call each: (row, prompt text, chosen text, rejected text)
    standard: list[tuple[int, str, str, str]] = []
    chat: list[tuple[int, str, str, str]] = []
    for i in range(n):
        try:
            pair: Pair = normalise_row(_read_row(batch, i), fmt, columns)
            if any(not pair.completion_text(side).strip() for side in pair.sides):
                out["status"][i] = EMPTY
            elif pair.chosen == pair.rejected:
                out["status"][i] = IDENTICAL
            elif not pair.conversational:
                standard.append((i, pair.prompt, pair.chosen, pair.rejected))
            elif not has_template:
                out["status"][i] = TEMPLATE
                out["problem"][i] = (
                    "conversational rows need a chat template and the tokenizer has none "
                    "(set data.chat_template)"
                )
            else:
                prompt_text = _render(tokenizer, pair.prompt, chat_template, True)
                texts = [
                    None if c is None else _render(tokenizer, pair.prompt + c, chat_template, False)
                    for c in (pair.chosen, pair.rejected)
                ]
                for side, text in zip(("chosen", "rejected"), texts):
                    if text is not None and not text.startswith(prompt_text):
                        k = _first_difference(prompt_text, text)
                        raise _TemplateMismatch(
                            f"{names[side]}: the chat template's prompt rendering (with the generation "
                            "prompt) is not a prefix of the whole conversation's rendering, so the "
                            f"completion cannot be split off: after {prompt_text[max(0, k - 20) : k]!r} "
                            f"the prompt has {prompt_text[k : k + 20]!r} but the conversation has "
                            f"{text[k : k + 20]!r} (use data.chat_template to fix the template)"
                        )
                chat.append((i, prompt_text, *texts))
        except BadRow as e:
            out["status"][i], out["problem"][i] = BAD_ROW, str(e)
        except _TemplateMismatch as e:
            out["status"][i], out["problem"][i] = TEMPLATE, str(e)

    eos = tokenizer.eos_token_id
    if standard:
        prompts = tokenizer([t[1] for t in standard], add_special_tokens=True)["input_ids"]
        completions = _tokenize_sides(tokenizer, standard)
        for j, (i, *_) in enumerate(standard):
            chosen, rejected = ([] if ids is None else _close_with_eos(ids, eos) for ids in completions[j])
            _store(out, i, prompts[j], chosen, rejected, names)
    if chat:
        prompts = tokenizer([t[1] for t in chat], add_special_tokens=False)["input_ids"]
        fulls = _tokenize_sides(tokenizer, chat)
        for j, (i, prompt_text, *_) in enumerate(chat):
            prompt, completions = prompts[j], []
            for side, full in zip(("chosen", "rejected"), fulls[j]):
                if full is None:  # the other side of an unpaired example
                    completions.append([])
                    continue
                if full[: len(prompt)] != prompt:
                    out["status"][i] = BAD_ROW
                    out["problem"][i] = (
                        f"{names[side]}: the completion's first characters merge with the end of the "
                        f"prompt ({prompt_text[-12:]!r}) into one token, so prompt + completion tokens "
                        "cannot equal the conversation's tokens (strip the completion's leading "
                        'whitespace, or set data.on_bad_row = "skip")'
                    )
                    break
                completions.append(_close_with_eos(full[len(prompt) :], eos))
            else:
                _store(out, i, prompt, *completions, names)
    return out


class _TemplateMismatch(Exception):
    pass


def _tokenize_sides(
    tokenizer: PreTrainedTokenizerBase, rows: list[tuple[int, str, str | None, str | None]]
) -> list[list[list[int] | None]]:
    """The chosen and rejected texts of `rows` tokenised in one call (no special tokens); None
    for an unpaired example's missing side."""
    texts = [text for row in rows for text in row[2:] if text is not None]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    return [[None if text is None else next(ids) for text in row[2:]] for row in rows]


def _store(
    out: dict[str, list], i: int, prompt: list[int], chosen: list[int], rejected: list[int], names: Mapping
) -> None:
    """Row i's ids, or its status; an unpaired example has [] on its missing side."""
    if not prompt:
        out["status"][i] = BAD_ROW
        out["problem"][i] = (
            f"{names['prompt']}: tokenises to nothing (a completion needs a prompt token before it)"
        )
    elif len(chosen) == 1 or len(rejected) == 1:  # only the EOS: the template dropped the content
        # (an unpaired example's missing side is [], kept)
        out["status"][i] = EMPTY
    elif chosen == rejected:
        out["status"][i] = IDENTICAL
    else:
        out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i] = prompt, chosen, rejected
        out["common_prefix"][i] = _common_prefix(chosen, rejected)
