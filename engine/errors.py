"""The one exception type for mistakes a user can cause.

Anything raised as `UserError` (a bad recipe key, a missing file, a malformed data row) is
reported by the entry point as one line per problem on stderr (`fsdpo: error: ...`) and exit
code 2, with no traceback. Every other exception is a bug and keeps its traceback.
"""


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
