"""The one exception type for mistakes a user can make.

The CLI turns a `UserError` into exit code 2 and a single line on stderr. Anything else that
escapes is an internal bug and keeps its traceback (exit code 1).
"""


class UserError(Exception):
    """Bad input a user can fix: the message says what is wrong and what to do."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of a third-party exception's message (at most `limit` characters), or its
    type name when the message is empty: what a one-line `UserError` quotes."""
    text = str(e)
    return text.splitlines()[0][:limit] if text.strip() else type(e).__name__
