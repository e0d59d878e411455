"""Row formats: one raw row becomes a `Pair` (prompt, chosen, rejected) or a `BadRow`.

- standard: `prompt`, `chosen` and `rejected` are strings.
- conversational: `prompt` is a list of messages; `chosen` and `rejected` are one assistant
  message each (a one-message list, or a bare string, which becomes that message).
- implicit_prompt: `chosen` and `rejected` are whole conversations ending with an assistant
  turn; the messages before it, identical in both, are the prompt.
- unpaired (KTO's): `prompt`, `completion` and a boolean `label` (true: desirable, false:
  undesirable); `prompt` and `completion` take the paired shapes (strings; a message list and
  one assistant message or a string; or, without a prompt, `completion` a whole conversation).
  The example becomes a `Pair` with its completion on the chosen side (desirable) or the
  rejected side (undesirable) and None on the other.

`auto` picks per row: a row with a `label` and no `chosen` is unpaired; a message-list prompt is
conversational; string completions are standard; anything else is implicit (so a string `prompt`
beside whole conversations, as in UltraFeedback, is ignored). Messages need string `role` and `content`; keys whose value is null (Arrow fills
absent struct fields with nulls) are dropped so templates see the message as written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError

ROLES = ("system", "developer", "user", "assistant", "tool")
COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
Messages = list[dict[str, Any]]


class BadRow(Exception):
    """A malformed row; the message is the problem, without the row's location."""


@dataclass(frozen=True)
class Pair:
    prompt: str | Messages
    chosen: str | Messages | None  # a string (standard) or one assistant message (conversational)
    rejected: str | Messages | None  # None: the other side of an unpaired example

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def sides(self) -> list[str]:
        """The completions the row has: both, or an unpaired example's one."""
        return [side for side in ("chosen", "rejected") if getattr(self, side) is not None]

    def completion_text(self, side: str) -> str:
        value = getattr(self, side)
        return value if isinstance(value, str) else value[-1]["content"]


def check_columns(name: str, column_names: Sequence[str], fmt: str, columns: Mapping[str, str]) -> list[str]:
    """The columns of a typed (parquet, `datasets`) source that hold its pairs; a UserError
    naming source `name` when one that `fmt` needs is missing. JSON rows have no schema and are
    checked row by row (`normalise_row`)."""
    names = {c: columns.get(c, c) for c in COLUMNS}
    unpaired = {c: columns.get(c, c) for c in UNPAIRED_COLUMNS}
    if fmt == "unpaired" or (
        fmt == "auto" and unpaired["label"] in column_names and names["chosen"] not in column_names
    ):
        for column in (unpaired["completion"], unpaired["label"]):
            if column not in column_names:
                raise UserError(
                    f"{name}: no column {column!r} (columns: {', '.join(column_names)}; "
                    'name yours with data.columns, e.g. { completion = "..." })'
                )
        return [c for c in unpaired.values() if c in column_names]
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


def _conversation(value: Any, column: str) -> Messages:
    """A whole conversation ending with an assistant turn (an implicit prompt's)."""
    if isinstance(value, str):
        raise BadRow(
            f"{column}: a string completion needs a string `prompt` column "
            "(an implicit prompt is read from message lists)"
        )
    conversation = _messages(value, column)
    if conversation[-1]["role"] != "assistant":
        raise BadRow(
            f"{column}: the conversation must end with an assistant turn, got {conversation[-1]['role']!r}"
        )
    return conversation


def _split_implicit(chosen: Any, rejected: Any, names: Mapping[str, str]) -> Pair:
    chosen, rejected = _conversation(chosen, names["chosen"]), _conversation(rejected, names["rejected"])
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


def _unpaired(row: Mapping[str, Any], names: Mapping[str, str]) -> Pair:
    """An unpaired example: its completion on the chosen (desirable) or rejected side."""
    for column in ("completion", "label"):
        if names[column] not in row:
            raise _missing(names[column], row)
    label, prompt, completion = row[names["label"]], row.get(names["prompt"]), row[names["completion"]]
    if not isinstance(label, bool):
        raise BadRow(
            f"{names['label']}: expected a boolean (true: desirable, false: undesirable), got {_describe(label)}"
        )
    if isinstance(prompt, list):
        prompt, completion = _messages(prompt, names["prompt"]), _completion(completion, names["completion"])
    elif isinstance(completion, str):
        if names["prompt"] not in row:
            raise _missing(names["prompt"], row)
        if not isinstance(prompt, str):
            raise BadRow(f"{names['prompt']}: expected a string, got {_describe(prompt)}")
    elif prompt is None or isinstance(prompt, str):  # implicit: the completion is a conversation
        conversation = _conversation(completion, names["completion"])
        if len(conversation) == 1:
            raise BadRow(
                f"{names['completion']}: only an assistant turn and no prompt (give a `prompt` column, "
                "or the whole conversation)"
            )
        prompt, completion = conversation[:-1], conversation[-1:]
    else:
        raise BadRow(f"{names['prompt']}: expected a string or a list of messages, got {_describe(prompt)}")
    return Pair(prompt, completion, None) if label else Pair(prompt, None, completion)


def normalise_row(row: Mapping[str, Any], fmt: str, columns: Mapping[str, str]) -> Pair:
    """The pair in `row` read as format `fmt` ("auto" decides per row), or raise BadRow.

    `columns` maps prompt/chosen/rejected (completion/label) to the row's own column names where
    they differ.
    """
    names = {c: columns.get(c, c) for c in COLUMNS + UNPAIRED_COLUMNS}
    if fmt == "unpaired" or (fmt == "auto" and names["label"] in row and names["chosen"] not in row):
        return _unpaired(row, names)
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
