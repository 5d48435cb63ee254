"""The one error type users see: a one-line message naming the file/line/field at fault.

The CLI catches `PotstillError`, prints its message on one line and exits with code 2.
"""

from __future__ import annotations


class PotstillError(Exception):
    """Bad input or state the user can fix. `str(err)` is the whole one-line message."""

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
