"""Training you can watch: each epoch's scalars and a few validation overlays streamed to
TensorBoard in ``fold_K/tensorboard/``, when the optional ``tensorboard`` package is installed
(``pip install medplan[tb]``) and the run has not switched it off (``TrainSettings.tensorboard``,
``--no-tensorboard``). Without the package nothing is written and nothing fails: one line in
training.log says so. ``tensorboard --logdir $MEDPLAN_RESULTS`` shows every run of a study.

The step of every event is the epoch, so the curves line up with metrics.jsonl (the same
numbers) and progress.png. A resumed run opens its writer with ``purge_step`` = the first epoch
it trains, so TensorBoard hides what a killed start wrote for that epoch or later (metrics can
run one epoch ahead of the checkpoint); a fresh start removes the event files of an earlier run
of the folder. Under DDP only rank 0 writes (the epoch loop enables it on the main process).
Watching must never end a run: a write that fails switches the stream off with one warning.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medplan.io import paint_labels

#: the folder of a run's event files, inside its fold folder
TENSORBOARD_DIR = "tensorboard"
#: how TensorBoard names its event files
EVENTS_GLOB = "events.out.tfevents.*"
#: metrics.jsonl key -> TensorBoard tag (the values are the file's, epoch by epoch)
SCALAR_TAGS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_mIoU": "val/mIoU", "val_mDSC": "val/mDSC",
               "lr": "train/lr", "epoch_time": "time/epoch_s"}
#: tags of the measurements that are not in metrics.jsonl
IMAGES_PER_S_TAG, GPU_MEMORY_TAG, OVERLAY_TAG = "train/images_per_s", "gpu/peak_memory_GiB", "val/overlays"
#: validation cases drawn each epoch (the first ones of the fold, so the same cases evolve)
OVERLAY_CASES = 4
#: longest side of one overlay tile (larger inputs are subsampled: event files stay small)
OVERLAY_TILE = 192

Sample = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # case id, image (C, h, w), label, prediction


def summary_writer_class() -> type | None:
    """torch's ``SummaryWriter``, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except ImportError:
        return None
    return SummaryWriter


def event_files(folder: str | Path) -> list[Path]:
    """The TensorBoard event files directly in ``folder`` (none when it does not exist)."""
    folder = Path(folder)
    return sorted(folder.glob(EVENTS_GLOB)) if folder.is_dir() else []


# ----------------------------------------------------------------------------- overlays
def to_rgb(image: np.ndarray) -> np.ndarray:
    """A preprocessed image (C, h, w) uint8 -> (h, w, 3) float: gray repeated, RGB kept, the
    first channel of any other channel count."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] != 3:
        image = np.repeat(image[:1], 3, axis=0)
    return np.moveaxis(image, 0, -1)


def overlay_panel(samples: Sequence[Sample], tile: int = OVERLAY_TILE) -> np.ndarray:
    """One (H, W, 3) uint8 picture: a row per case of image | ground truth | prediction, each
    subsampled to at most ``tile`` pixels a side, with a 2-pixel white gap."""
    rows = []
    for _, image, label, pred in samples:
        rgb = to_rgb(image)
        step = max(1, -(-max(rgb.shape[:2]) // tile))
        rgb, label, pred = rgb[::step, ::step], np.asarray(label)[::step, ::step], np.asarray(pred)[::step, ::step]
        tiles = [rgb, paint_labels(rgb, label), paint_labels(rgb, pred)]
        gap = np.full((rgb.shape[0], 2, 3), 255.0, np.float32)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    padded = []
    for r in rows:
        padded += [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255.0),
                   np.full((2, width, 3), 255.0, np.float32)]
    return np.clip(np.round(np.concatenate(padded[:-1], axis=0)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the stream
class TensorBoardLog:
    """One start of a run's TensorBoard stream, opened on its first epoch (so a start that
    fails before then leaves no event file); inert when switched off or not installed."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, first_epoch: int, say: Callable[[str], Any],
                 warn: Callable[[str], Any] | None = None):
        self.log_dir = Path(log_dir)
        self.enabled = bool(enabled)
        self.first_epoch = int(first_epoch)
        self.say, self.warn = say, warn or say
        self.writer: Any = None
        self.tried = False

    def open(self) -> bool:
        """The writer, opened on the first call: True when event files are being written."""
        if self.tried:
            return self.writer is not None
        self.tried = True
        if not self.enabled:
            return False
        writer_class = summary_writer_class()
        if writer_class is None:
            self.say("TensorBoard: not installed, no event files written (pip install medplan[tb] to watch runs)")
            return False
        try:
            if self.first_epoch <= 1:  # a fresh start: an earlier run's curves would mix with this one's
                for f in event_files(self.log_dir):
                    f.unlink()
            self.writer = writer_class(str(self.log_dir), purge_step=self.first_epoch if self.first_epoch > 1 else None)
        except OSError as exc:
            self.warn(f"TensorBoard: cannot write {self.log_dir} ({exc.strerror or exc}); not streaming this run")
            return False
        self.say(f"TensorBoard: watch this run with: tensorboard --logdir {self.log_dir}")
        return True

    def write_epoch(self, record: dict, extra: dict[str, float | None] | None = None,
                    samples: Sequence[Sample] = ()) -> None:
        """The epoch's metrics.jsonl ``record`` (:data:`SCALAR_TAGS`), ``extra`` scalars by tag
        and the overlay panel of ``samples``, at step = its epoch; flushed so a watcher sees it."""
        if self.writer is None:
            return
        step = int(record["epoch"])
        scalars = {tag: record.get(key) for key, tag in SCALAR_TAGS.items()}
        scalars.update(extra or {})
        try:
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, float(value), step)
            if samples:
                self.writer.add_image(OVERLAY_TAG, overlay_panel(samples), step, dataformats="HWC")
            self.writer.flush()
        except OSError as exc:
            self.warn(f"TensorBoard: writing {self.log_dir} failed ({exc.strerror or exc}); not streaming this run")
            self.close()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):  # the run's own files matter, not the watcher's
                writer.close()
