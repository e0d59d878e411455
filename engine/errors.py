"""The one exception type for mistakes a user can cause.

Anything raised as `UserError` (a bad recipe key, a missing file, a malformed data row) is
reported by the entry point as one line per problem on stderr (`fsdpo: error: ...`) and exit
code 2, with no traceback. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem in the user's recipe, data, model folder or output folder.

    Usually one message; checks that find several independent problems at once (the recipe's
    keys, types and ranges) raise one UserError with a message per problem, so a user fixes
    them all in one go. `lines` holds the messages; `str()` is them joined by newlines.
    """

    def __init__(self, *lines: str) -> None:
        if not lines:
            raise TypeError("UserError needs at least one message")
        super().__init__(*lines)  # args = the lines, so the error pickles as it was made
        self.lines = list(lines)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type's name when it has none: how a foreign
    exception (a library's, the OS's) is quoted inside a one-line UserError."""
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest in spelling to `name`, or None if none is close."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return close[0] if close else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the choice closest in spelling to `name`, or "" if none is close."""
    close = closest(name, choices)
    return suggestion(close) if close else ""


def suggestion(*names: str) -> str:
    """' (did you mean "a" or "b"?)'."""
    return " (did you mean " + " or ".join(f'"{n}"' for n in names) + "?)"
