"""The one exception type for mistakes a user can cause.

Anything raised as `UserError` (a bad recipe key, a missing file, a malformed data row) is
reported by the entry point as one line on stderr and exit code 2, with no traceback. Every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's recipe, data, model folder or output folder."""
