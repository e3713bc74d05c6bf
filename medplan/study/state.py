"""What is done, judged from the files on disk (never from what a job said about itself), and
which folds are stale: trained with other settings than the study runs now."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from medplan.architectures import get_entry, is_model
from medplan.errors import MedplanError
from medplan.io import read_json
from medplan.paths import preprocessed_dir, results_dir, results_root
from medplan.plan import Plan
from medplan.rundir import LR_SEARCH_SUMMARY, RunDir
from medplan.stagefiles import load_plan
from medplan.study.model import REPORT_STATE, Study, Task, tasks
from medplan.trainers import default_model_options, resolve_lr

#: plan keys that say when and by what a plan was written, not what it decides
PLAN_VOLATILE = ("created", "medplan_version", "reasons", "raw_dir")
_plan_cache: dict[str, tuple[tuple, str, Plan]] = {}


def fold_complete(fold_dir: Path | RunDir) -> bool:
    """A cross-validation fold's results are complete: final checkpoint and validation summary."""
    return RunDir(fold_dir).is_complete(validates=True)


def lr_search_summary(study: Study, dataset: str, arch: str) -> dict | None:
    """``ARCH/lr_search.json`` when it is the search this study asks for (grid and epochs), else None."""
    path = results_dir(dataset, arch) / LR_SEARCH_SUMMARY
    if not path.is_file():
        return None
    data = read_json(path)
    if study.lrs and sorted(float(x) for x in data.get("grid", [])) != sorted(float(x) for x in study.lrs):
        return None
    if study.epochs_lr_search and int(data.get("epochs", -1)) != int(study.epochs_lr_search):
        return None
    return data


# ----------------------------------------------------------------------------- stale folds
def plan_hash(plan: dict) -> str:
    """A hash of a plan's decisions (its canonical JSON, as config.json records it, without
    :data:`PLAN_VOLATILE` keys)."""
    content = {k: v for k, v in plan.items() if k not in PLAN_VOLATILE}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _current_plan(dataset: str) -> tuple[str, Plan]:
    """(hash, plan) of the dataset's plans.json, re-read only when the file changed."""
    path = preprocessed_dir(dataset) / "plans.json"
    st_ = path.stat()
    stamp = (st_.st_mtime_ns, st_.st_size)
    cached = _plan_cache.get(str(path))
    if cached is None or cached[0] != stamp:
        plan = load_plan(dataset)
        cached = (stamp, plan_hash(plan.to_json()), plan)
        _plan_cache[str(path)] = cached
    return cached[1], cached[2]


def expected_run(study: Study, dataset: str, arch: str) -> dict[str, Any] | None:
    """What a fold of this study would record in config.json now (plan hash, lr, epochs,
    batch_size, model_options); None while the LR search that picks the LR has not finished."""
    digest, plan = _current_plan(dataset)
    if is_model(arch) and get_entry(arch).external:  # its own recipe decides LR, epochs and batch size
        options = default_model_options(arch, study.model_options.get(arch))
        return {"plan": digest, "external": True, "model_options": json.loads(json.dumps(options, default=str))}
    if study.lr_search:
        search = lr_search_summary(study, dataset, arch)
        if search is None or search.get("best_lr") is None:
            return None
        lr = float(search["best_lr"])
    else:
        lr = resolve_lr(dataset, arch, plan, None)[0]  # what medplan_train picks without --lr
    batch = study.overrides.get("batch_size") or plan.batch_size
    options = default_model_options(arch, study.model_options.get(arch))
    return {"plan": digest, "lr": lr, "epochs": int(study.epochs_cv or plan.epochs.cv),
            "batch_size": int(batch), "model_options": json.loads(json.dumps(options, default=str))}


def _shown(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else json.dumps(value, sort_keys=True, default=str)


def stale_reasons(study: Study, task: Task) -> list[str] | None:
    """Why a fold's recorded run differs from what the study runs now: ``[]`` when it matches,
    ``None`` when there is nothing to compare yet (no run recorded, or the LR search that
    picks the LR has not finished)."""
    run = RunDir.of(task.dataset, task.arch, task.fold)
    config_path = run.config_path
    if not config_path.is_file():
        if fold_complete(run):
            return ["no config.json records how it was trained"]
        return None
    expected = expected_run(study, task.dataset, task.arch)
    if expected is None:
        return None
    try:
        config = read_json(config_path)
    except MedplanError:
        return ["config.json is unreadable"]
    if not isinstance(config, dict):
        return ["config.json is not an object"]
    why = []
    recorded_plan = config.get("plan")
    if not isinstance(recorded_plan, dict) or plan_hash(recorded_plan) != expected["plan"]:
        why.append("another plan (plans.json changed since)")
    lr = config.get("lr")
    if expected.get("external"):
        pass  # LR, epochs and batch size are the external code's (nnU-Net's), not the study's
    elif not isinstance(lr, (int, float)) or not math.isclose(float(lr), expected["lr"], rel_tol=1e-9):
        why.append(f"lr {_shown(lr)} (study: {_shown(expected['lr'])})")
    for key in () if expected.get("external") else ("epochs", "batch_size"):
        if config.get(key) != expected[key]:
            why.append(f"{key} {_shown(config.get(key))} (study: {_shown(expected[key])})")
    recorded = config.get("model_options")
    if json.loads(json.dumps(recorded, default=str)) != expected["model_options"]:
        why.append(f"model options {_shown(recorded)} (study: {_shown(expected['model_options'])})")
    return why


def stale_folds(study: Study) -> dict[str, list[str]]:
    """Fold key -> what differs, for every fold that can be judged now and is stale."""
    out = {}
    for t in tasks(study):
        if t.kind == "fold":
            why = stale_reasons(study, t)
            if why:
                out[t.key] = why
    return out


def stale_advice(stale: dict[str, list[str]]) -> str:
    first, why = next(iter(stale.items()))
    more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
    return (f"{len(stale)} fold(s) were trained with other settings than this study's ({first}: {'; '.join(why)}"
            f"{more}); rerun with --rerun-stale to retrain them (their results are replaced), or move them "
            "away; medplan_benchmark --status lists them")


# ----------------------------------------------------------------------------- done
def completed_folds(study: Study) -> list[str]:
    return [t.key for t in tasks(study) if t.kind == "fold" and is_done(study, t)]


def is_done(study: Study, task: Task) -> bool:
    """Done = its results are on disk (never what a job said about itself) and, for a fold,
    recorded with the settings the study runs now (not stale)."""
    if task.kind == "lr_search":
        return lr_search_summary(study, task.dataset, task.arch) is not None
    if task.kind == "fold":
        return fold_complete(RunDir.of(task.dataset, task.arch, task.fold)) and stale_reasons(study, task) == []
    state = results_root() / REPORT_STATE
    if not state.is_file():
        return False
    folds = completed_folds(study)
    return len(folds) == sum(t.kind == "fold" for t in tasks(study)) and read_json(state).get("folds") == folds


def plan_jobs(study: Study) -> list[Task]:
    """The tasks still to run (not done on disk)."""
    return [t for t in tasks(study) if not is_done(study, t)]
