"""One rule for every name that becomes part of a path or reaches a script.

Dataset names, architecture names, case ids and fold names come from the command line and
from files other people made (``cases.csv``, ``splits.json``, ``study.json``,
``dataset.json``). Each one is checked here before it is joined to a folder, so a name like
``../../x``, ``/etc`` or one holding a newline can never leave medplan's roots or put a line
into a generated batch script. The rule: letters, digits, ``.``, ``_`` and ``-``; not starting
with a dot (no ``.``/``..``, no hidden files); at most :data:`MAX_LENGTH` characters.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from medplan.errors import MedplanError

MAX_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
RULE = f"letters, digits, '.', '_' or '-', not starting with '.', at most {MAX_LENGTH} characters"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_LENGTH and _NAME.fullmatch(name) is not None


def check_name(name: object, kind: str = "name", source: str | Path | None = None) -> str:
    """Return ``name`` unchanged if it follows the rule, else a MedplanError naming ``kind``
    (e.g. "dataset name", "case id") and ``source`` (the file it came from, if any)."""
    if not is_valid_name(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80] + "...")
        raise MedplanError(f"invalid {kind} {shown}: must be {RULE}", source)
    return name  # type: ignore[return-value]


def check_names(names: Iterable[object], kind: str = "name", source: str | Path | None = None) -> list[str]:
    """Check every name of a list read from a file; the first bad one is the error."""
    return [check_name(n, kind, source) for n in names]


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` made absolute, if it lies inside ``root``, else a MedplanError: the last line of
    defence for every path medplan writes under its roots.

    The check is lexical (``..`` collapsed, symlinks not followed): a user who links
    ``$MEDPLAN_RESULTS/CAMUS`` to another disk on purpose keeps that choice, while a name
    holding ``..`` or an absolute path cannot climb out."""
    root_a = Path(os.path.normpath(os.path.abspath(Path(root).expanduser())))
    path_a = Path(os.path.normpath(os.path.abspath(Path(path).expanduser())))
    if path_a != root_a and root_a not in path_a.parents:
        raise MedplanError(f"refusing to use a path outside {root_a}", path)
    return path_a


def check_fold(fold: object, source: str | Path | None = None) -> int | str:
    """A fold as it becomes ``fold_K`` in a path: a non-negative integer (``3``, ``"3"``) or a
    name such as ``all``; returned as an int when it is one, else as the checked string."""
    if isinstance(fold, bool):
        raise MedplanError(f"invalid fold {fold!r}: must be an integer >= 0 or a name ({RULE})", source)
    if isinstance(fold, int):
        if fold < 0:
            raise MedplanError(f"invalid fold {fold!r}: must be an integer >= 0 or a name ({RULE})", source)
        return fold
    name = check_name(fold, "fold", source)
    return int(name) if name.isdigit() else name
