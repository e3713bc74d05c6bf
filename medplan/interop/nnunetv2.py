"""nnU-Net v2 run by its own code for the ``nnunetv2`` architecture: its folders, its commands,
its training record and its predictor (issue 15 item 3).

Where things go (nnU-Net's three environment variables point into medplan's folders):

* ``$MEDPLAN_PREPROCESSED/NAME/nnunet/raw`` and ``.../nnunet/preprocessed``: the dataset
  exported by :func:`medplan.interop.nnunet.export_nnunet` (the plan's kept cases, medplan's
  folds as ``splits_final.json``), planned and preprocessed by ``nnUNetv2_plan_and_preprocess``
  once per dataset (again only when the export changed), under the dataset's stage lock;
* ``RESULTS/NAME/nnunetv2/fold_K/nnunet``: ``nnUNet_results`` of that fold's training.

The folders are the dataset's own, so its nnU-Net id (:func:`default_dataset_id`, derived from
the name) can never meet another dataset's. Training is ``nnUNetv2_train ID 2d K -tr TRAINER
-p PLANS -device DEV [--c]`` in a child process whose output goes to the fold's
``training.log``. A trainer is any nnU-Net trainer class (``nnUNetTrainer_250epochs``), found as
``nnUNetv2_train`` finds it: in nnU-Net's package, then in the folders of
``$nnUNet_extTrainer`` (nnU-Net's own way to add trainers).

:class:`NnunetPredictor` predicts with nnU-Net's ``nnUNetPredictor`` (sliding window, Gaussian
weighting, mirroring as the trainer allows: what nnU-Net's own validation and
``nnUNetv2_predict`` do), the weights of every fold averaged. nnU-Net's checkpoints are read with
``torch.load(weights_only=True)`` plus an allowlist of numpy's scalar and float dtypes (its
training log holds numpy floats), never with the full unpickler.

nnunetv2 is imported only inside the functions that need it (an optional extra,
``pip install medplan[nnunet]``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medplan.errors import MedplanError
from medplan.interop.nnunet import ENV_PREPROCESSED, ENV_RAW, ENV_RESULTS, NnunetExport, export_nnunet
from medplan.io import atomic_write_json, read_image, read_json, to_uint8
from medplan.locks import dataset_stage
from medplan.paths import preprocessed_dir
from medplan.plan import Plan
from medplan.preprocessing import prepare_image

#: the sub-folder of nnU-Net's files (under the dataset's preprocessed folder and the fold folder)
NNUNET_DIR = "nnunet"
#: written beside nnU-Net's plans once preprocessing succeeded: what it was made from
PREPARED = "medplan_prepared.json"
INSTALL = "pip install medplan[nnunet]"
DEFAULT_TRAINER, DEFAULT_PLANS, DEFAULT_CONFIGURATION = "nnUNetTrainer", "nnUNetPlans", "2d"
DEFAULT_PLANNER = "ExperimentPlanner"


def require_nnunetv2(arch: str = "nnunetv2") -> str:
    """nnunetv2's version; a one-line MedplanError saying what to install when it is missing."""
    try:
        import nnunetv2  # noqa: F401 - the optional extra
    except ImportError:
        raise MedplanError(f"architecture {arch!r} needs {INSTALL} (the nnunetv2 package is not installed)") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunetv2")
    except PackageNotFoundError:  # importable from a source tree without metadata
        return "unknown"


def default_dataset_id(dataset: str) -> int:
    """A stable nnU-Net id 500..999 for ``dataset`` (its own folders hold no other dataset)."""
    return 500 + zlib.crc32(dataset.encode()) % 500


def nnunet_roots(dataset: str) -> tuple[Path, Path]:
    """``(raw, preprocessed)`` roots of nnU-Net's copy of ``dataset``."""
    base = preprocessed_dir(dataset) / NNUNET_DIR
    return base / "raw", base / "preprocessed"


def nnunet_env(raw: Path, pre: Path, results: Path) -> dict[str, str]:
    """This process's environment with nnU-Net's folders set (and DA workers left to nnU-Net)."""
    env = dict(os.environ)
    env.update({ENV_RAW: str(raw), ENV_PREPROCESSED: str(pre), ENV_RESULTS: str(results)})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def model_folder(results: Path, name: str, trainer: str, plans: str, configuration: str) -> Path:
    """``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONF`` (nnU-Net's layout)."""
    return results / name / f"{trainer}__{plans}__{configuration}"


def _console(name: str, module: str, function: str) -> list[str]:
    """nnU-Net's console script ``name`` (beside this Python), else the function behind it."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as m; m()"]


def run_logged(cmd: Sequence[str], env: dict[str, str], log: Path, what: str) -> None:
    """Run ``cmd`` with its output appended to ``log``; a failure is one line naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        raise MedplanError(f"{what} failed (exit {done.returncode}): {last[:300]} (full output in the log)", log)


# ----------------------------------------------------------------------------- the dataset
@dataclass(frozen=True)
class PreparedDataset:
    """nnU-Net's copy of a dataset, planned and preprocessed."""

    export: NnunetExport
    raw_root: Path
    preprocessed_root: Path
    commands: tuple[tuple[str, ...], ...]   # what ran now (empty when it was up to date)


def prepare_dataset(dataset: str, dataset_id: int, plans: str, configuration: str, log: Path,
                    planner: str = DEFAULT_PLANNER) -> PreparedDataset:
    """Export ``dataset`` and run ``nnUNetv2_plan_and_preprocess`` on it, once: under the dataset's
    stage lock, and again only when the export (cases, folds) or the plans asked for changed."""
    raw, pre = nnunet_roots(dataset)
    with dataset_stage(dataset, "nnunet plan and preprocess"):
        export = export_nnunet(dataset, dataset_id, raw_root=raw, preprocessed_root=pre, results_root=raw.parent /
                               "results", force=True, progress=False)
        folder = pre / export.name
        signature = read_json(export.raw_dir / "dataset.json")["medplan"]["signature"]
        wanted = {"signature": signature, "plans": plans, "configuration": configuration, "planner": planner}
        marker = folder / PREPARED
        done = marker.is_file() and {k: read_json(marker).get(k) for k in wanted} == wanted
        if done and (folder / f"{plans}.json").is_file() and (folder / f"{plans}_{configuration}").is_dir():
            return PreparedDataset(export, raw, pre, ())
        marker.unlink(missing_ok=True)
        cmd = (*_console("nnUNetv2_plan_and_preprocess",
                         "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_and_preprocess_entry"),
               "-d", str(dataset_id), "-c", configuration, "--verify_dataset_integrity")
        if os.environ.get("nnUNet_def_n_proc"):  # nnU-Net's own default for its process counts
            cmd += ("-npfp", os.environ["nnUNet_def_n_proc"], "-np", os.environ["nnUNet_def_n_proc"])
        if planner != DEFAULT_PLANNER:
            cmd += ("-pl", planner)
        if plans != DEFAULT_PLANS:
            cmd += ("-overwrite_plans_name", plans)
        env = nnunet_env(raw, pre, raw.parent / "results")
        if env.get("nnUNet_n_proc_DA") == "0":  # its planner hands this to torch.set_num_threads, which refuses 0
            env["nnUNet_n_proc_DA"] = "1"
        run_logged(cmd, env, log, "nnUNetv2_plan_and_preprocess")
        atomic_write_json(marker, {**wanted, "nnunetv2": require_nnunetv2(), "command": list(cmd)})
    return PreparedDataset(export, raw, pre, (tuple(cmd),))


def train_command(dataset_id: int, configuration: str, fold: int | str, trainer: str, plans: str, device: str,
                  continue_training: bool) -> list[str]:
    """``nnUNetv2_train`` for one fold (nnU-Net's console script, else the function behind it)."""
    args = [str(dataset_id), configuration, str(fold), "-tr", trainer, "-p", plans, "-device", device]
    if continue_training:
        args.append("--c")
    return [*_console("nnUNetv2_train", "nnunetv2.run.run_training", "run_training_entry"), *args]


# ----------------------------------------------------------------------------- its record
def _numpy_allowlist() -> list:
    import numpy._core.multiarray as multiarray  # numpy 2, as torch 2.6+ needs

    allowed: list = [multiarray.scalar, np.dtype]
    for name in ("Float32DType", "Float64DType", "Int64DType"):
        if hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint as data (weights_only, numpy scalars allowed); one line on failure."""
    if not path.is_file():
        raise MedplanError("nnU-Net checkpoint not found (train the fold first)", path)
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is one line naming the file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MedplanError(f"not an nnU-Net checkpoint or not safe to load ({first[:200]})", path) from None
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise MedplanError("not an nnU-Net checkpoint (no network_weights)", path)
    return state


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def metrics_records(state: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.jsonl lines from nnU-Net's training log (its logger, kept in the checkpoint):
    train/val loss (nnU-Net's Dice + CE), pseudo Dice per class and its EMA, LR, epoch time."""
    log = state.get("logging") or {}
    n = len(log.get("train_losses") or [])
    out = []
    for i in range(n):
        def at(key: str) -> Any:
            values = log.get(key) or []
            return _plain(values[i]) if i < len(values) else None

        start, end = at("epoch_start_timestamps"), at("epoch_end_timestamps")
        out.append({"epoch": i + 1, "train_loss": at("train_losses"), "val_loss": at("val_losses"),
                    "val_mIoU": None, "val_mDSC": None, "val_pseudo_dice": at("dice_per_class_or_region"),
                    "val_mean_fg_dice": at("mean_fg_dice"), "val_ema_fg_dice": at("ema_fg_dice"),
                    "lr": at("lrs"), "epoch_time": None if start is None or end is None else end - start,
                    "source": "nnU-Net"})
    return out


# ----------------------------------------------------------------------------- prediction
def trainer_class(name: str) -> type:
    """The nnU-Net trainer class ``name``, found as ``nnUNetv2_train -tr`` finds it (nnU-Net's
    package, then ``$nnUNet_extTrainer``); one line when there is none."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise MedplanError(f"nnU-Net has no trainer {name!r} (nnunetv2/training/nnUNetTrainer, or a folder of "
                           "$nnUNet_extTrainer, must define it as a subclass of nnUNetTrainer)") from None


@dataclass
class NnunetFold:
    """One fold of an nnunetv2 run, for prediction."""

    fold: str
    model_dir: Path        # nnU-Net's TRAINER__PLANS__CONF folder
    checkpoint: Path


class NnunetPredictor:
    """Trained nnunetv2 folds as one model with :class:`medplan.inference.Predictor`'s interface
    (``load``, ``predict``, ``predict_batch``, ``plan``, ``folds``): nnU-Net's predictor, the
    folds' weights averaged, every image at its original size."""

    def __init__(self, folds: list[NnunetFold], plan: Plan, trainer: str, *, device: str | torch.device = "cpu",
                 batch_size: int | None = None, tta: bool = True):
        require_nnunetv2()
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        if not folds:
            raise MedplanError("an nnU-Net predictor needs at least one trained fold")
        self.folds, self.plan = folds, plan
        ref = folds[0].model_dir
        plans, dataset_json = read_json(ref / "plans.json"), read_json(ref / "dataset.json")
        for f in folds[1:]:
            if read_json(f.model_dir / "plans.json") != plans:
                raise MedplanError(f"fold {f.fold} was planned differently by nnU-Net than fold {folds[0].fold}; "
                                   "ensemble folds of one plan only", f.model_dir / "plans.json")
        states = [load_nnunet_checkpoint(f.checkpoint) for f in folds]
        manager = PlansManager(plans)
        configuration = states[0]["init_args"]["configuration"]
        conf = manager.get_configuration(configuration)
        channels = determine_num_input_channels(manager, conf, dataset_json)
        heads = manager.get_label_manager(dataset_json).num_segmentation_heads
        network = trainer_class(trainer).build_network_architecture(
            manager, conf, channels, heads, enable_deep_supervision=False)
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        # tta: nnU-Net's mirroring along the axes its trainer allows (its own validation mirrors;
        # medplan_predict mirrors only with --tta, as for every architecture)
        self.predictor = nnUNetPredictor(device=self.device, allow_tqdm=False, use_mirroring=bool(tta))
        self.predictor.manual_initialization(network, manager, conf, [s["network_weights"] for s in states],
                                             dataset_json, states[0]["trainer_name"],
                                             states[0].get("inference_allowed_mirroring_axes"))
        network.load_state_dict(states[0]["network_weights"])
        self.batch_size = int(batch_size or 1)
        self.channels, self.class_names = plan.channels, plan.class_names
        self.num_classes, self.input_size, self.tta = plan.num_classes, plan.input_size, bool(tta)

    def load(self, image: Any) -> np.ndarray:
        """Path or array -> uint8 (H, W[, C]) (the plan's window for >8-bit images)."""
        array = read_image(Path(image)) if isinstance(image, (str, os.PathLike)) else np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise MedplanError(f"expected a 2D gray or RGB image (H, W) or (H, W, 3), got shape {array.shape}")
        window = self.plan.intensity_window
        return to_uint8(array, (window.low, window.high) if window else None)

    def _input(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W[, C]) -> (C, 1, H, W) float32 as nnU-Net's NaturalImage2DIO reads a file."""
        h, w = image.shape[:2]
        return prepare_image(image, (h, w), self.channels)[:, None].astype(np.float32)

    def predict_one(self, image: np.ndarray, return_probabilities: bool = False):
        """One loaded image -> label map (H, W) uint8 [, probabilities (K, H, W) float32]."""
        out = self.predictor.predict_single_npy_array(self._input(image), {"spacing": (999, 1, 1)}, None, None,
                                                      return_probabilities)
        seg, probs = out if return_probabilities else (out, None)
        labels = np.asarray(seg)[0].astype(np.uint8)
        if not return_probabilities:
            return labels
        return labels, np.asarray(probs)[:, 0].astype(np.float32)

    def _predict_loaded(self, chunk: list[np.ndarray], return_probabilities: bool) -> list:
        return [self.predict_one(im, return_probabilities) for im in chunk]

    def predict_batch(self, images: Sequence[Any], return_probabilities: bool = False) -> list:
        return self._predict_loaded([self.load(im) for im in images], return_probabilities)

    def predict(self, image: Any, return_probabilities: bool = False):
        return self.predict_batch([image], return_probabilities)[0]


def fold_from_pointer(fold_dir: Path, pointer: dict[str, Any], where: Path) -> NnunetFold:
    """The nnU-Net fold and checkpoint an nnunetv2 fold's ``checkpoint_*.pt`` names (its
    ``nnunet`` block: nnU-Net's model folder, relative to the fold folder, and checkpoint file)."""
    block = pointer.get("nnunet")
    if not isinstance(block, dict) or not isinstance(block.get("model_dir"), str) \
            or not isinstance(block.get("checkpoint"), str) or "/" in block["checkpoint"]:
        raise MedplanError("names no nnU-Net model folder and checkpoint (not an nnunetv2 run)", where)
    model_dir = (fold_dir / block["model_dir"]).resolve()
    if fold_dir.resolve() not in model_dir.parents:
        raise MedplanError("'nnunet.model_dir' must lie inside the fold folder", where)
    fold = str(pointer.get("fold"))
    return NnunetFold(fold=fold, model_dir=model_dir, checkpoint=model_dir / f"fold_{fold}" / block["checkpoint"])


def dumps(obj: Any) -> str:
    """Canonical JSON (for comparing recorded options)."""
    return json.dumps(obj, sort_keys=True, default=str)
