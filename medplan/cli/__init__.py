"""Console entry points: thin wrappers that parse arguments, call the library, print."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from medplan.errors import MedplanError


def entry_point(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Turn MedplanError (and Ctrl-C) into a one-line message and a non-zero exit."""

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
            if argv is None:
                sys.exit(code or 0)
            return code or 0

        return main

    return wrap
