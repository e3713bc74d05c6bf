"""Console entry points: thin wrappers that parse arguments, call the library, print."""
from __future__ import annotations

import errno
import functools
import sys
from typing import Callable

from medplan.errors import MedplanError
from medplan.io import describe_os_error, find_os_error

# OS errors that are the machine's state, not a bug: shown as one line even when another
# exception wraps them (torch.save turns a full disk into a RuntimeError).
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
                getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError to report for ``exc``: itself, or a disk/permission error it wraps."""
    if isinstance(exc, OSError):
        return exc
    found = find_os_error(exc)
    return found if found is not None and found.errno in _USER_ERRNOS else None


def entry_point(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Turn MedplanError, OS errors (disk full, permission denied, read-only folder) and Ctrl-C
    into a one-line message and a non-zero exit (2 for bad input, 1 for the OS, 130 for Ctrl-C)."""

    def wrap(func: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(func)
        def main(argv: list[str] | None = None) -> int:
            try:
                code = func(argv)
            except MedplanError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                code = 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                code = 130
            except Exception as exc:  # noqa: BLE001 -- only OS errors become messages
                os_error = os_error_of(exc)
                if os_error is None:
                    raise
                print(f"{prog}: error: {describe_os_error(os_error)}", file=sys.stderr)
                code = 1
            if argv is None:
                sys.exit(code or 0)
            return code or 0

        return main

    return wrap
