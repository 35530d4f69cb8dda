"""The one exception users should ever see."""

from __future__ import annotations

from pathlib import Path


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


def not_utf8(path: object, error: UnicodeDecodeError, fix: str) -> DanluError:
    """A text file that is not UTF-8: most often a spreadsheet's or an old editor's in its code page."""
    byte = error.object[error.start]
    return DanluError(
        f"'{path}' is not UTF-8 text (it holds byte 0x{byte:02x}, as Latin-1 and Windows-1252 files do)", fix
    )


def read_user_text(path: str | Path) -> str:
    """A text file a user wrote (a template, texts to embed), a byte-order mark skipped; one that is not
    UTF-8 is one line naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, "save it as UTF-8") from None


def one_line(error: BaseException, last: bool = False) -> str:
    """The first (or last: the exception of a traceback's text) non-empty line of an error's text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[-1] if last else lines[0]


def printable(text: str) -> str:
    """text on one line: each character a terminal would not show as itself (a newline, a tab, an escape
    sequence's start) written as a Python string literal writes it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
