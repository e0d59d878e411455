"""Row formats: one raw row becomes a `Pair` (prompt, chosen, rejected) or a `BadRow`.

- standard: `prompt`, `chosen` and `rejected` are strings.
- conversational: `prompt` is a list of messages; `chosen` and `rejected` are one assistant
  message each (a one-message list, or a bare string, which becomes that message).
- implicit_prompt: `chosen` and `rejected` are whole conversations ending with an assistant
  turn; the messages before it, identical in both, are the prompt.

`auto` picks per row: a message-list prompt is conversational; string completions are standard;
anything else is implicit (so a string `prompt` beside whole conversations, as in UltraFeedback,
is ignored). Messages need string `role` and `content`; keys whose value is null (Arrow fills
absent struct fields with nulls) are dropped so templates see the message as written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")
COLUMNS = ("prompt", "chosen", "rejected")
Messages = list[dict[str, Any]]


class BadRow(Exception):
    """A malformed row; the message is the problem, without the row's location."""


@dataclass(frozen=True)
class Pair:
    prompt: str | Messages
    chosen: str | Messages  # a string (standard) or one assistant message (conversational)
    rejected: str | Messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def completion_text(self, side: str) -> str:
        value = getattr(self, side)
        return value if isinstance(value, str) else value[-1]["content"]


def check_columns(name: str, column_names: Sequence[str], fmt: str, columns: Mapping[str, str]) -> list[str]:
    """The columns of a typed (parquet, `datasets`) source that hold its pairs; a UserError
    naming source `name` when one that `fmt` needs is missing. JSON rows have no schema and are
    checked row by row (`normalise_row`)."""
    names = {c: columns.get(c, c) for c in COLUMNS}
    needed = [names["chosen"], names["rejected"]] + ([] if fmt == "implicit_prompt" else [names["prompt"]])
    for column in needed:
        if column not in column_names and (column != names["prompt"] or fmt != "auto"):
            raise UserError(
                f"{name}: no column {column!r} (columns: {', '.join(column_names)}; "
                'name yours with data.columns, e.g. { chosen = "..." })'
            )
    return [c for c in names.values() if c in column_names]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value[:30]!r})" if len(value) <= 30 else "a string"
    names = {list: "a list", dict: "an object", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _messages(value: Any, column: str) -> Messages:
    if not isinstance(value, list):
        raise BadRow(f"{column}: expected a list of messages, got {_describe(value)}")
    if not value:
        raise BadRow(f"{column}: expected a non-empty list of messages, got an empty list")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRow(f"{column}[{k}]: expected a message object, got {_describe(message)}")
        message = {key: v for key, v in message.items() if v is not None}
        if "role" not in message or "content" not in message:
            sharegpt = "from" in message or "value" in message
            hint = " (ShareGPT-style `from`/`value` messages need converting)" if sharegpt else ""
            raise BadRow(f"{column}[{k}]: a message needs `role` and `content`{hint}")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise BadRow(f"{column}[{k}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise BadRow(f"{column}[{k}].content: expected a string, got {_describe(message['content'])}")
        messages.append(message)
    return messages


def _completion(value: Any, column: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, column)
    roles = [m["role"] for m in messages]
    if roles != ["assistant"]:
        raise BadRow(f"{column}: expected one assistant message, got roles {roles}")
    return messages


def _split_implicit(chosen: Any, rejected: Any, names: Mapping[str, str]) -> Pair:
    conversations = []
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            raise BadRow(
                f"{names[side]}: a string completion needs a string `prompt` column "
                "(an implicit prompt is read from message lists)"
            )
        conversation = _messages(value, names[side])
        if conversation[-1]["role"] != "assistant":
            raise BadRow(
                f"{names[side]}: the conversation must end with an assistant turn, "
                f"got {conversation[-1]['role']!r}"
            )
        conversations.append(conversation)
    chosen, rejected = conversations
    if chosen[:-1] != rejected[:-1]:
        k = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise BadRow(
            f"{names['chosen']} and {names['rejected']} differ before the final assistant turn (message {k})"
        )
    if len(chosen) == 1:
        raise BadRow(
            f"{names['chosen']} and {names['rejected']} share no prompt: each is only an assistant "
            "turn (give a `prompt` column, or whole conversations)"
        )
    return Pair(chosen[:-1], chosen[-1:], rejected[-1:])


def _missing(column: str, row: Mapping[str, Any]) -> BadRow:
    keys = ", ".join(map(str, row)) or "none"
    return BadRow(f"missing column {column!r} (the row's columns: {keys}; name yours with data.columns)")


def normalise_row(row: Mapping[str, Any], fmt: str, columns: Mapping[str, str]) -> Pair:
    """The pair in `row` read as format `fmt` ("auto" decides per row), or raise BadRow.

    `columns` maps prompt/chosen/rejected to the row's own column names where they differ.
    """
    names = {c: columns.get(c, c) for c in COLUMNS}
    for side in ("chosen", "rejected"):
        if names[side] not in row:
            raise _missing(names[side], row)
    prompt, chosen, rejected = (row.get(names[c]) for c in COLUMNS)
    if fmt == "auto":
        if isinstance(prompt, list):
            fmt = "conversational"
        elif isinstance(chosen, str) != isinstance(rejected, str):
            raise BadRow(
                f"{names['chosen']} is {_describe(chosen)} but {names['rejected']} is "
                f"{_describe(rejected)}: both must be strings or both messages"
            )
        elif isinstance(chosen, str) and isinstance(rejected, str):
            fmt = "standard"
        elif prompt is None or isinstance(prompt, str):
            fmt = "implicit_prompt"
        else:
            raise BadRow(
                f"{names['prompt']}: expected a string or a list of messages, got {_describe(prompt)}"
            )

    if fmt == "implicit_prompt":
        return _split_implicit(chosen, rejected, names)
    if names["prompt"] not in row:
        raise _missing(names["prompt"], row)
    if fmt == "standard":
        for column, value in zip(COLUMNS, (prompt, chosen, rejected)):
            if not isinstance(value, str):
                raise BadRow(f"{names[column]}: expected a string, got {_describe(value)}")
        return Pair(prompt, chosen, rejected)
    return Pair(
        _messages(prompt, names["prompt"]),
        _completion(chosen, names["chosen"]),
        _completion(rejected, names["rejected"]),
    )
