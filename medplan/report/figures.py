"""The report's plots: matplotlib figures at a paper's column width, each written as PNG (for the
page), PDF and SVG (for the paper), and redrawn only when the data behind them changed.

A figure is named by what it shows and keyed by a hash of its input data
(:func:`medplan.report.collect.digest`); ``figures/manifest.json`` keeps the keys of the last
build, so an incremental rebuild redraws only the figures whose data (or this module's
:data:`STYLE_VERSION`) changed. Drawing runs in worker processes (one per CPU).

Honest by construction: bars start at zero, and a model with missing folds is drawn hatched
(bars) or hollow (dots) with its fold count beside it, never like a complete one.
"""
from __future__ import annotations

import inspect
import math
import multiprocessing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medplan.evaluation.report import grouped_bars
from medplan.io import atomic_write_bytes, atomic_write_json, read_json
from medplan.parallel import run_tasks
from medplan.report.collect import digest

#: change to redraw every figure; a change to the drawing code (this module, the shared bar
#: drawing) redraws them too: the key includes a hash of that code
STYLE_VERSION = 1
#: a one-column figure in a two-column paper (inches)
COLUMN_WIDTH = 3.5
FORMATS = ("png", "pdf", "svg")
MANIFEST = "manifest.json"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 5.5,
                         "xtick.labelsize": 6, "ytick.labelsize": 6, "svg.hashsalt": "medplan",
                         "pdf.compression": 6})
    return plt


@lru_cache(maxsize=1)
def code_key() -> str:
    """A hash of the code that draws: this module and the shared bars (:func:`grouped_bars`)."""
    return digest([Path(__file__).read_text(encoding="utf-8"), inspect.getsource(grouped_bars)])


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100.0 * float(v)


# ---------------------------------------------------------------------------- the figures
def bars(data: dict[str, Any]):
    """mDSC (or a class's Dice) per model, grouped: ``groups``, ``series`` {label: [means, sds]}, ``partial``."""
    plt = _plt()
    n = max(1, len(data["groups"]) * len(data["series"]))
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.0 + 0.08 * len(data["series"])))
    series = {k: ([np.nan if m is None else m for m in v[0]], [np.nan if s is None else s for s in v[1]])
              for k, v in data["series"].items()}
    grouped_bars(ax, data["groups"], series, data.get("partial"))
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"])
    if n > 6:
        ax.tick_params(axis="x", labelrotation=20)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    return fig


def fold_dots(data: dict[str, Any]):
    """Per model, each fold's mDSC as a dot over the mean line: the spread behind the mean."""
    plt = _plt()
    models = data["models"]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
    rng = np.random.default_rng(0)
    for i, m in enumerate(models):
        values = [_pct(v) for v in m["values"] if v is not None]
        x = i + rng.uniform(-0.12, 0.12, len(values))
        partial = bool(m["partial"])
        ax.scatter(x, values, s=10, facecolors="none" if partial else "tab:blue", edgecolors="tab:blue",
                   linewidths=0.8, zorder=3)
        if values:
            ax.hlines(np.mean(values), i - 0.3, i + 0.3, color="black" if not partial else "grey", lw=1,
                      linestyles="-" if not partial else "--")
        if partial:
            ax.text(i + 0.32, 0.03, m["partial"], ha="left", va="bottom", fontsize=5, rotation=90,
                    transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([m["arch"] for m in models], rotation=30 if len(models) > 3 else 0, ha="right"
                       if len(models) > 3 else "center")
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("mDSC per fold (%)")
    ax.set_title(data["title"])
    ax.grid(axis="y", alpha=0.3)
    return fig


def curves(data: dict[str, Any]):
    """Training loss, validation mIoU and LR of every fold; best epoch dotted, early stop dashed."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(COLUMN_WIDTH, 3.9), sharex=True)
    colours = plt.get_cmap("tab10").colors
    for k, f in enumerate(data["folds"]):
        c = colours[k % len(colours)]
        ep = f["epoch"]
        for ax, key in zip(axes, ("train_loss", "val_mIoU", "lr")):
            y = [np.nan if v is None else v for v in f[key]]
            ax.plot(ep, [100 * v for v in y] if key == "val_mIoU" else y, color=c, lw=0.8, label=f"fold {f['fold']}")
        if f.get("best_epoch") is not None and f["best_epoch"] in ep:
            v = f["val_mIoU"][ep.index(f["best_epoch"])]
            if v is not None:
                axes[1].plot([f["best_epoch"]], [100 * v], marker="o", ms=3, color=c)
        if f.get("stopped_epoch") is not None:
            for ax in axes:
                ax.axvline(f["stopped_epoch"], color=c, lw=0.7, ls="--")
    axes[0].set_ylabel("train loss")
    axes[1].set_ylabel("val mIoU (%)")
    axes[2].set_ylabel("LR")
    if any(v for f in data["folds"] for v in f["lr"] if v):
        axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_title(data["title"])
    axes[2].legend(ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.5), frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def cost(data: dict[str, Any]):
    """Quality against cost: mean mDSC over datasets against GMACs (or images/s)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
    for p in data["points"]:
        partial = bool(p["partial"])
        ax.scatter([p["x"]], [_pct(p["y"])], s=14, facecolors="none" if partial else "tab:blue",
                   edgecolors="tab:blue", zorder=3)
        ax.annotate(p["arch"] + (" (partial)" if partial else ""), (p["x"], _pct(p["y"])), fontsize=5,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(data["xlabel"])
    if data.get("log_x"):
        ax.set_xscale("log")
    ax.set_ylabel("mean mDSC over datasets (%)")
    ax.set_title(data["title"])
    ax.grid(alpha=0.3)
    return fig


KINDS: dict[str, Callable[[dict[str, Any]], Any]] = {"bars": bars, "fold_dots": fold_dots, "curves": curves,
                                                     "cost": cost}


def _render(task: tuple[str, dict[str, Any], str]) -> str:
    """Draw one figure and write its three files (a worker process's job)."""
    kind, data, base = task
    plt = _plt()
    import io

    fig = KINDS[kind](data)
    try:
        # the tight box measured once (one draw), not once per format
        box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.03)
        for fmt in FORMATS:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=200 if fmt == "png" else None, bbox_inches=box,
                        metadata={"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None))
            atomic_write_bytes(f"{base}.{fmt}", buf.getvalue())
    finally:
        plt.close(fig)
    return base


class Figures:
    """The figures of one build: :meth:`add` names one, :meth:`draw` draws those whose data changed."""

    def __init__(self, folder: Path, incremental: bool = True):
        self.folder = Path(folder)
        self.incremental = incremental
        path = self.folder / MANIFEST
        old: dict[str, str] = {}
        if incremental and path.is_file():
            try:
                old = dict(read_json(path))
            except Exception:  # a damaged manifest only costs a full redraw
                old = {}
        self.old = old
        self.wanted: dict[str, tuple[str, dict[str, Any], str]] = {}
        self.drawn: list[str] = []

    def add(self, name: str, kind: str, data: dict[str, Any]) -> dict[str, str]:
        """Register a figure; returns its files relative to the report (``png``, ``pdf``, ``svg``)."""
        key = digest([STYLE_VERSION, code_key(), kind, data])
        self.wanted[name] = (kind, data, key)
        return {fmt: f"{self.folder.name}/{name}.{fmt}" for fmt in FORMATS}

    def _current(self, name: str, key: str) -> bool:
        return self.old.get(name) == key and all((self.folder / f"{name}.{fmt}").is_file() for fmt in FORMATS)

    def draw(self, num_workers: int | None = None) -> list[str]:
        """Draw what changed (everything without ``incremental``), remove figures no longer
        wanted, write the manifest; returns the names drawn."""
        self.folder.mkdir(parents=True, exist_ok=True)
        todo = [(kind, data, str(self.folder / name)) for name, (kind, data, key) in self.wanted.items()
                if not (self.incremental and self._current(name, key))]
        workers = 0 if len(todo) < 4 else num_workers
        # the report is built at the end of a study, in a process that has trained or measured
        # models: forking that process can copy a thread pool's lock held and hang the worker
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None
        for base in run_tasks(_render, todo, num_workers=workers, desc="report figures", progress=False,
                              start_method=method):
            self.drawn.append(Path(base).name)
        for name in set(self.old) - set(self.wanted):
            for fmt in FORMATS:
                (self.folder / f"{name}.{fmt}").unlink(missing_ok=True)
        atomic_write_json(self.folder / MANIFEST, {n: k for n, (_, _, k) in sorted(self.wanted.items())})
        return self.drawn


def bar_data(title: str, ylabel: str, groups: Sequence[str], series: dict[str, tuple[list, list]],
             partial: dict[str, list[str]]) -> dict[str, Any]:
    """JSON-able input of :func:`bars` (NaN as None, so the hash is stable)."""
    def clean(values: list) -> list:
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]

    return {"title": title, "ylabel": ylabel, "groups": list(groups),
            "series": {k: [clean(m), clean(s)] for k, (m, s) in series.items()}, "partial": partial}
