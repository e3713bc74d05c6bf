"""Importers from official download layouts to the medplan raw format, and synthetic data.

``convert_dataset(fmt, source, name)`` writes ``$MEDPLAN_RAW/NAME`` (see docs/formats.md);
``detect_format(path)`` names the layout a folder holds; ``resolve_raw_dataset(name)`` (the one
raw-folder resolver) finds a converted dataset or imports a download found in
``$MEDPLAN_RAW/NAME`` first; ``load_raw_index(folder)`` reads it back as a :class:`RawIndex`.
"""
from __future__ import annotations

from medplan.datasets.base import FORMATS, Case, Collected, Importer, register
# importing the format modules registers them; the order is the detection order
from medplan.datasets import camus, isic2018, neopolyp, busi, polyp, nnunet, folder  # noqa: E402,F401
from medplan.datasets.writer import convert_dataset, detect_format  # noqa: E402
from medplan.datasets.raw import RawIndex, load_raw_index, resolve_raw_dataset  # noqa: E402


def __getattr__(name: str):
    """``medplan.datasets.synthetic`` on first use: its scipy import costs every command
    (convert, plan, preprocess) ~0.15 s of start-up that only tests and the demo need."""
    if name == "synthetic":
        import importlib

        return importlib.import_module("medplan.datasets.synthetic")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMATS", "Case", "Collected", "Importer", "register", "convert_dataset", "detect_format",
           "resolve_raw_dataset", "RawIndex", "load_raw_index", "synthetic"]
