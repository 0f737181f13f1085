"""The one exception type for mistakes a user can make.

The CLI turns a `UserError` into exit code 2 and a single line on stderr. Anything else that
escapes is an internal bug and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad input a user can fix: the message says what is wrong and what to do."""
