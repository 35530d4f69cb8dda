"""The one exception users should ever see."""

from __future__ import annotations


class DanluError(Exception):
    """A problem the user can fix: what was wrong, and how to fix it.

    The CLI prints it as one line and exits with code 2; `--debug` shows the traceback.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.hint})" if self.hint else self.message
