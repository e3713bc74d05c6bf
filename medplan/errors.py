"""One error type for everything a user can get wrong.

Library code raises :class:`MedplanError` with a one-line message that names the file and
the reason; the CLI layer prints it without a traceback and exits non-zero.
"""
from __future__ import annotations

from pathlib import Path


class MedplanError(Exception):
    """A user-facing error: bad input, missing files, impossible arguments."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)
