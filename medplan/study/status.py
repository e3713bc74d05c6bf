"""``medplan_benchmark --status`` and ``--dry-run``: every task's state from the files (and the
queue, when a backend can see it), and the jobs a run would submit with a GPU-hour estimate."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medplan.architectures.measure import estimate_seconds, load_measurements
from medplan.paths import results_dir, results_root
from medplan.rundir import RunDir, lr_search_runs
from medplan.stagefiles import load_plan, load_splits
from medplan.study.backends import Backend
from medplan.study.model import REPORT_FILE, Study, dependencies, tasks
from medplan.study.state import is_done, plan_jobs, stale_reasons
from medplan.trainers.tensorboard import EVENTS_GLOB, TENSORBOARD_DIR

#: the study's web report (medplan_evaluate --all-folds / --html), relative to the results root
REPORT_HTML = Path("report") / "index.html"
#: where runs keep their event files: RESULTS/DATASET/ARCH/fold_K and .../lr_search/lr_X/fold_K
RUN_FOLDER_PATTERNS = ("*/*/fold_*", "*/*/lr_search/*/fold_*")


def _metrics_of(run: RunDir) -> tuple[float | None, float]:
    """(best validation mIoU, seconds trained) of a run, from its metrics.jsonl."""
    try:
        rows = run.metrics()
    except (OSError, ValueError):
        return None, 0.0
    values = [r["val_mIoU"] for r in rows if r.get("val_mIoU") is not None]
    return (max(values) if values else None), float(sum(r.get("epoch_time") or 0 for r in rows))


def status_rows(study: Study, backend: Backend | None = None) -> list[dict[str, Any]]:
    """One row per task: state, epochs run, run time, best validation mIoU so far."""
    live: set[str] = set()
    if backend is not None:
        ids = [r["job_id"] for r in study.jobs.values() if r.get("state") == "submitted" and r.get("job_id")]
        try:
            live = backend.alive(ids)
        except Exception:  # noqa: BLE001 - status works without the queue
            live = set()
    rows = []
    for t in tasks(study):
        rec = study.jobs.get(t.key, {})
        best, seconds = None, 0.0
        if t.kind == "fold":
            best, seconds = _metrics_of(RunDir.of(t.dataset, t.arch, t.fold))
        elif t.kind == "lr_search":
            for run in lr_search_runs(results_dir(t.dataset, t.arch)):
                b, s = _metrics_of(run)
                seconds += s
                best = b if best is None or (b is not None and b > best) else best
        stale = stale_reasons(study, t) if t.kind == "fold" else None
        if is_done(study, t):
            state = "done"
        elif rec.get("state") == "submitted" and rec.get("job_id") in live:
            state = "running" if seconds else "queued"
        elif stale:
            state = "stale"
        elif rec.get("state") == "failed":
            state = f"failed x{rec.get('failures', 1)}"
        elif seconds:
            state = "partial"
        else:
            state = "todo"
        rows.append({"dataset": t.dataset or "-", "arch": t.arch or "-", "stage": t.stage, "state": state,
                     "job": rec.get("job_id") or "-", "time_s": seconds, "best_val_mIoU": best,
                     "log": rec.get("log") if state.startswith("failed") else None,
                     "stale": stale if state == "stale" else None})
    if (results_root() / REPORT_FILE).is_file() and rows[-1]["state"] == "todo":
        rows[-1]["state"] = "outdated"
    return rows


def watch_hints(root: Path | None = None) -> list[str]:
    """Where to look besides this table: the web report, once it exists, and the TensorBoard
    command, once a run has written event files (nothing for what is not there yet)."""
    root = results_root() if root is None else Path(root)
    lines = []
    report = root / REPORT_HTML
    if report.is_file():
        lines.append(f"report: {report}")
    events = (f for pattern in RUN_FOLDER_PATTERNS for f in root.glob(f"{pattern}/{TENSORBOARD_DIR}/{EVENTS_GLOB}"))
    if next(events, None) is not None:
        lines.append(f"watch training: tensorboard --logdir {root}")
    return lines


def format_status(rows: list[dict[str, Any]], root: Path | None = None) -> str:
    """The status table, with the report and TensorBoard hints (:func:`watch_hints`) above it
    (the table's last line stays the count of tasks per state)."""
    header = ["dataset", "arch", "stage", "state", "job", "time", "best val mIoU"]
    body = []
    for r in rows:
        t = r["time_s"]
        body.append([r["dataset"], r["arch"], r["stage"], r["state"], str(r["job"]),
                     "-" if not t else (f"{t / 3600:.1f} h" if t >= 3600 else f"{t:.0f} s"),
                     "-" if r["best_val_mIoU"] is None else f"{100 * r['best_val_mIoU']:.1f}"])
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    hints = watch_hints(root)
    lines = hints + [""] * bool(hints)
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
              for cells in [header, ["-" * w for w in widths]] + body]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"].split()[0]] = counts.get(r["state"].split()[0], 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        if r["log"]:
            lines.append(f"{r['dataset']}/{r['arch']}/{r['stage']}: log {r['log']}")
    stale = [r for r in rows if r.get("stale")]
    for r in stale:
        lines.append(f"{r['dataset']}/{r['arch']}/{r['stage']}: stale: {'; '.join(r['stale'])}")
    if stale:
        lines.append("stale folds do not count as complete; medplan_benchmark --rerun-stale retrains them "
                     "(replacing their results)")
    return "\n".join(lines)


def dry_run(study: Study) -> tuple[list[dict[str, Any]], float | None]:
    """The jobs a run would submit, with an upper-bound GPU-hour estimate per job (None when
    an architecture has no efficiency measurement; ``medplan_models --measure`` makes one)."""
    measured = load_measurements()
    all_tasks = tasks(study)
    jobs, total, known = [], 0.0, True
    for t in plan_jobs(study):
        row: dict[str, Any] = {"job": t.key, "after": [d.key for d in dependencies(study, t, all_tasks)
                                                       if not is_done(study, d)],
                               "epochs": None, "runs": 1, "gpu_hours": None,
                               "stale": stale_reasons(study, t) if t.kind == "fold" else None}
        if t.kind != "report":
            plan = load_plan(t.dataset)
            split = load_splits(t.dataset)[0 if t.kind == "lr_search" else t.fold]
            if t.kind == "lr_search":
                row["epochs"] = int(study.epochs_lr_search or plan.epochs.lr_search)
                row["runs"] = len(study.lrs or plan.lr_grid)
            else:
                row["epochs"] = int(study.epochs_cv or plan.epochs.cv)
            m = measured.get(t.arch)
            if m:
                seconds = row["runs"] * estimate_seconds(m, plan.input_size, len(split["train"]),
                                                         len(split["val"]), row["epochs"])
                row["gpu_hours"] = seconds / 3600 * (study.slurm.gpus_per_job if study.executor == "slurm" else 1)
                total += row["gpu_hours"]
            else:
                known = False
        jobs.append(row)
    return jobs, (total if known else None)


def format_dry_run(jobs: list[dict[str, Any]], total: float | None, study: Study) -> str:
    lines = [f"{len(jobs)} job(s) to run with the {study.executor} executor:"]
    for j in jobs:
        cost = "" if j["epochs"] is None else f"  {j['runs']} x {j['epochs']} epochs"
        est = "" if j["gpu_hours"] is None else f"  ~{j['gpu_hours']:.2f} GPU-h"
        after = f"  after {', '.join(j['after'][:3])}{' ...' if len(j['after']) > 3 else ''}" if j["after"] else ""
        stale = f"  STALE: {'; '.join(j['stale'])}" if j.get("stale") else ""
        lines.append(f"  {j['job']}{cost}{est}{after}{stale}")
    n_stale = sum(bool(j.get("stale")) for j in jobs)
    if n_stale:
        lines.append(f"{n_stale} stale fold(s): " + ("retrained (--rerun-stale), replacing their results"
                                                     if study.rerun_stale else
                                                     "a run refuses until you pass --rerun-stale or move them away"))
    if total is None:
        lines.append("GPU-hours: unknown for architectures without a measurement (run medplan_models --measure)")
    else:
        lines.append(f"GPU-hours (upper bound, no early stopping): {total:.2f}")
    return "\n".join(lines)
