"""The failures a user fixes by changing a setting or a file, told apart from bugs.

A `UserError`'s message names the setting or the file to change; front ends print it as one
line (no traceback) and exit with status 2. Anything else is a bug or an outage and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user fixes (missing data, a bad checkpoint, a run folder in use); the
    message says which setting or file. `transient` marks one a retry may cure (a network
    timeout), as opposed to one that fails the same way every time (a DNS failure)."""

    transient: bool = False


class DatasetError(UserError, RuntimeError):
    """A dataset is missing, malformed or failed verification; the message names the file."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none: enough to
    say why a file was skipped or refused, in one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
