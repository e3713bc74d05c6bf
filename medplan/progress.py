"""The one progress bar of every stage (convert, fingerprint, preprocess, train, predict,
evaluate, explain): tqdm with an ETA on a terminal; in a log file (stderr not a terminal) it
refreshes rarely and is not left behind, so a batch log gets no flood of carriage returns.
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

#: seconds between refreshes on a terminal and in a log file
TERMINAL_INTERVAL = 0.2
LOG_INTERVAL = 30.0


def interactive() -> bool:
    """Whether stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable[T], *, total: int, desc: str, enabled: bool | None = None, unit: str = "it",
                 leave: bool = True) -> Iterable[T]:
    """``iterable`` with a bar; the bare iterable when ``enabled`` is false (``None``: only on a
    terminal). ``leave=False`` removes the finished bar (the trainer's bar per epoch)."""
    if enabled is None:
        enabled = interactive()
    if not enabled:
        return iterable
    return _bar(iterable, total, desc, unit, leave)


def _bar(iterable: Iterable[T], total: int, desc: str, unit: str, leave: bool) -> Iterator[T]:
    from tqdm.auto import tqdm  # imported when a bar is shown: most library calls show none

    tty = interactive()
    with tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=TERMINAL_INTERVAL if tty else LOG_INTERVAL,
              dynamic_ncols=tty, leave=leave and tty) as bar:
        yield from bar
