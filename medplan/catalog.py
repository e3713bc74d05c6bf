"""What medplan ships, known without importing it: the built-in architectures' names, so that
an unknown name on the command line is answered in a fraction of a second, before torch and the
model code are imported (issue 13: fast answers). The registry stays the authority: a test
checks this list against it, and with an architecture plug-in installed (it registers only when
imported) every well-formed name is left to the registry."""
from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Iterable

from medplan.names import check_name
from medplan.registry import UnknownNameError

#: the entry-point group of architecture plug-ins (medplan.architectures.registry reads it here)
ARCHITECTURE_PLUGINS = "medplan.architectures"

#: every architecture medplan registers itself (tests/test_catalog.py: equal to the registry's built-ins)
BUILTIN_ARCHITECTURES = frozenset({
    "hiformer_b", "internimage_t", "llm4seg", "missformer", "nnunet_2d", "nnunetv2", "segformer_b3", "segnext_l",
    "swin_umamba", "syncsam", "transnext_t", "ukan_l", "unet", "unet_small", "vwformer_convnext_s",
    "vwformer_mit_b3",
})


def plugins_installed(group: str = ARCHITECTURE_PLUGINS) -> bool:
    """Whether an installed distribution declares entry points in ``group`` (metadata only)."""
    return any(True for _ in importlib.metadata.entry_points(group=group))


def check_architectures(names: Iterable[object]) -> list[str]:
    """Each name checked by the name rule and, unless a plug-in may add it, against the built-ins;
    an unknown one is the registry's kind of error (close names, the known ones)."""
    names = [check_name(n, "architecture name") for n in names]
    unknown = [n for n in names if n not in BUILTIN_ARCHITECTURES]
    if unknown and not plugins_installed():
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(BUILTIN_ARCHITECTURES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownNameError(f"unknown architecture {name!r}{hint}; known: {', '.join(sorted(BUILTIN_ARCHITECTURES))}")
    return names
