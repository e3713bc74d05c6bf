"""What a run tells its user: training.log, metrics.jsonl, progress.png and a progress bar.

The bar (with ETA; :func:`medplan.progress.progress_bar`, the one bar of every stage) is shown
only when stderr is a terminal unless the run asks for it; in batch logs each epoch is one
summary line, so a 150-epoch run leaves 150 readable lines and no flood of carriage returns.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from medplan.io import atomic_write_bytes, with_path
from medplan.progress import interactive, progress_bar  # noqa: F401 - also imported from here
from medplan.rundir import read_metrics, write_metrics  # noqa: F401 - metrics.jsonl's format lives with the run folder

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


def format_epoch_line(record: dict, total_epochs: int) -> str:
    """One line per epoch: the numbers a user scans for in a log."""
    parts = [f"epoch {record['epoch']:>{len(str(total_epochs))}}/{total_epochs}",
             f"train_loss {record['train_loss']:.4f}"]
    if record.get("val_loss") is not None:
        parts += [f"val_loss {record['val_loss']:.4f}", f"val_mIoU {record['val_mIoU']:.4f}",
                  f"val_mDSC {record['val_mDSC']:.4f}"]
    parts += [f"lr {record['lr']:.3g}", f"{record['epoch_time']:.1f}s"]
    if record.get("best"):
        parts.append("(best)")
    return "  ".join(parts)


def plot_progress(history: list[dict], path: Path) -> None:
    """progress.png: losses, validation mIoU/mDSC and the learning rate against epochs."""
    if not history:
        return
    import io

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

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
    for ax in (ax_loss, ax_metric, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
