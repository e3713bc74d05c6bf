"""What a run tells its user: training.log, metrics.jsonl, progress.png and a progress bar.

The bar (with ETA; :func:`medplan.progress.progress_bar`, the one bar of every stage) is shown
only when stderr is a terminal unless the run asks for it; in batch logs each epoch is one
summary line, so a 150-epoch run leaves 150 readable lines and no flood of carriage returns.
Each epoch line (and the bar's label) also says how long the whole run has left
(:func:`run_eta`), not only the epoch.
"""
from __future__ import annotations

import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from medplan.io import atomic_write_bytes, with_path
from medplan.progress import interactive, progress_bar  # noqa: F401 - also imported from here
from medplan.rundir import read_metrics, write_metrics  # noqa: F401 - metrics.jsonl's format lives with the run folder

if TYPE_CHECKING:  # annotations only: matplotlib is imported when a figure is drawn
    from matplotlib.figure import Figure

LOG_FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _Pending(logging.Handler):
    """Keeps records in memory until the log file may be written (:meth:`RunLog.attach`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _LogFile(logging.FileHandler):
    """``training.log``: a full disk or a lost permission is kept and raised, naming the file, by
    the next :meth:`RunLog.info` (one line from the CLI), not printed as a logging traceback."""

    error: OSError | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)
        elif self.error is None:
            self.error = with_path(exc, self.baseFilename, "write")

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:  # flushing on close: never hide the error that is ending the run
            if self.error is None:
                self.error = with_path(exc, self.baseFilename, "write")


class RunLog:
    """Writes to ``training.log`` (appending across resumes) and echoes to the console.

    With ``path=None, buffer=True`` the messages wait in memory until :meth:`attach` names
    the file (a fresh run writes into its folder only once it could be built)."""

    def __init__(self, path: Path | None, *, console: bool = True, name: str = "medplan.run", buffer: bool = False):
        self.logger = logging.getLogger(f"{name}.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._handlers: list[logging.Handler] = []
        self._pending: _Pending | None = None
        if path is not None:
            self._handlers.append(self._file_handler(path))
        elif buffer:
            self._pending = _Pending()
            self._handlers.append(self._pending)
        if console:
            stream = logging.StreamHandler(sys.stdout)
            stream.setFormatter(logging.Formatter("%(message)s"))
            self._handlers.append(stream)
        for h in self._handlers:
            self.logger.addHandler(h)

    @staticmethod
    def _file_handler(path: Path) -> logging.Handler:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        return handler

    def attach(self, path: Path) -> None:
        """Start writing to ``path`` (appending), beginning with the messages kept so far."""
        handler = self._file_handler(path)
        if self._pending is not None:
            for record in self._pending.records:
                handler.handle(record)
            self.logger.removeHandler(self._pending)
            self._handlers.remove(self._pending)
            self._pending = None
        self.logger.addHandler(handler)
        self._handlers.append(handler)

    def info(self, message: str) -> None:
        self.logger.info(message)
        self._raise_write_error()

    def warning(self, message: str) -> None:
        self.logger.warning(f"WARNING: {message}")
        self._raise_write_error()

    def _raise_write_error(self) -> None:
        for h in self._handlers:
            error = getattr(h, "error", None)
            if error is not None:
                h.error = None
                raise error

    def close(self) -> None:
        for h in self._handlers:
            self.logger.removeHandler(h)
            h.close()
        self._handlers.clear()


def format_duration(seconds: float) -> str:
    """``0.3s``, ``45s``, ``12m05s``, ``3h07m``, ``2d04h``: short enough for an epoch line; medplan's
    one duration format (epoch lines, ETAs and the memory/time estimate before training)."""
    if 0 < seconds < 9.95:  # a step of a fraction of a second is not "0s"
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


#: epochs whose times make the per-epoch estimate (the latest ones: the first epoch is often slower)
ETA_WINDOW = 5


@dataclass(frozen=True)
class RunEta:
    """Time left for the whole run: to the end of its epoch budget, and to the earliest epoch
    at which early stopping could end it (None when it cannot end before the budget)."""

    seconds_left: float
    epoch_seconds: float
    epochs_left: int
    earliest_stop_epoch: int | None = None
    seconds_to_earliest_stop: float | None = None


def run_eta(epoch_times: Sequence[float], epochs_done: int, total_epochs: int,
            patience_left: int | None = None) -> RunEta | None:
    """The whole run's ETA from the measured epoch times: remaining epochs (up to the budget,
    ``total_epochs``) x the median of the last :data:`ETA_WINDOW` epoch times. ``patience_left``
    (early stopping's patience minus its bad epochs so far) gives the earliest end if the
    monitored metric stops improving. None before any epoch was timed or once the budget is spent."""
    times = [float(t) for t in epoch_times if t is not None and math.isfinite(float(t)) and float(t) >= 0]
    left = int(total_epochs) - int(epochs_done)
    if not times or left <= 0:
        return None
    epoch_s = statistics.median(times[-ETA_WINDOW:])
    earliest = None
    if patience_left is not None and 0 < patience_left < left:
        earliest = int(epochs_done) + int(patience_left)
    return RunEta(seconds_left=left * epoch_s, epoch_seconds=epoch_s, epochs_left=left, earliest_stop_epoch=earliest,
                  seconds_to_earliest_stop=None if earliest is None else patience_left * epoch_s)


def format_eta(eta: RunEta | None) -> str:
    """``run left ~1h02m (25 epochs x 2m29s)`` or, where early stopping could end it sooner,
    ``run left <= 1h02m (25 epochs x 2m29s; 12m25s if early stopping ends it at epoch 30)``;
    empty without an estimate."""
    if eta is None:
        return ""
    per = f"{eta.epochs_left} epoch{'s' if eta.epochs_left != 1 else ''} x {format_duration(eta.epoch_seconds)}"
    if eta.earliest_stop_epoch is None:
        return f"run left ~{format_duration(eta.seconds_left)} ({per})"
    return (f"run left <= {format_duration(eta.seconds_left)} ({per}; {format_duration(eta.seconds_to_earliest_stop)} "
            f"if early stopping ends it at epoch {eta.earliest_stop_epoch})")


def format_epoch_line(record: dict, total_epochs: int, eta: str = "") -> str:
    """One line per epoch: the numbers a user scans for in a log, then the run's ETA."""
    parts = [f"epoch {record['epoch']:>{len(str(total_epochs))}}/{total_epochs}",
             f"train_loss {record['train_loss']:.4f}"]
    if record.get("val_loss") is not None:
        parts += [f"val_loss {record['val_loss']:.4f}", f"val_mIoU {record['val_mIoU']:.4f}",
                  f"val_mDSC {record['val_mDSC']:.4f}"]
    parts += [f"lr {record['lr']:.3g}", f"{record['epoch_time']:.1f}s"]
    if record.get("best"):
        parts.append("(best)")
    if eta:
        parts.append(f"| {eta}")
    return "  ".join(parts)


def progress_title(dataset: str, arch: str, fold: int | str, lr: float | None = None) -> str:
    """progress.png's title: which run this is, so a figure copied out of its folder still says."""
    title = f"{dataset} / {arch} / fold {fold}"
    return title if lr is None else f"{title} (LR search, lr {lr:g})"


def progress_figure(history: list[dict], title: str | None = None) -> "Figure":
    """The figure of progress.png: losses, validation mIoU/mDSC and the learning rate against
    whole-numbered epochs, titled with the run (:func:`progress_title`)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]

    def series(key):
        return [r.get(key) if r.get(key) is not None else math.nan for r in history]

    fig = Figure(figsize=(9, 8), dpi=90)
    ax_loss, ax_metric, ax_lr = fig.subplots(3, 1, sharex=True)
    ax_loss.plot(epochs, series("train_loss"), label="train loss", color="tab:blue")
    if any(r.get("val_loss") is not None for r in history):
        ax_loss.plot(epochs, series("val_loss"), label="val loss", color="tab:red")
        ax_metric.plot(epochs, series("val_mIoU"), label="val mIoU", color="tab:green")
        ax_metric.plot(epochs, series("val_mDSC"), label="val mDSC", color="tab:olive")
        ax_metric.legend(loc="lower right")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_metric.set_ylabel("validation")
    ax_lr.plot(epochs, series("lr"), color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers (shared x axis)
    if len(set(epochs)) == 1:  # one epoch: matplotlib's default span (+-5%) holds no whole number but it
        ax_lr.set_xlim(epochs[0] - 1, epochs[0] + 1)
    for ax in (ax_loss, ax_metric, ax_lr):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_progress(history: list[dict], path: Path, title: str | None = None) -> None:
    """progress.png (:func:`progress_figure`), written atomically; nothing before the first epoch."""
    if not history:
        return
    import io

    buf = io.BytesIO()
    progress_figure(history, title).savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
