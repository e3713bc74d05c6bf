"""The study's report task: ``summary.*`` of every fold (``medplan_evaluate --all-folds``),
``study_report.md`` with the efficiency table (``study_report.json`` records which folds it saw)
and the web report ``report/index.html``."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from medplan.architectures import build_model, count_flops, count_parameters, get_entry
from medplan.architectures.measure import load_measurements, measure_models
from medplan.evaluation.aggregate import gather_all_folds
from medplan.evaluation.report import markdown, write_reports
from medplan.io import atomic_write_json, atomic_write_text
from medplan.paths import results_root
from medplan.report import build_report
from medplan.stagefiles import load_plan
from medplan.study.model import REPORT_FILE, REPORT_STATE, Study, tasks
from medplan.study.state import completed_folds


def efficiency_rows(study: Study) -> list[dict[str, Any]]:
    """Per architecture: parameters, GMACs at the first dataset's planned size, measured speed."""
    plan = load_plan(study.datasets[0])
    size = plan.input_size
    measured = load_measurements()
    missing = [a for a in study.archs if not get_entry(a).external
               and (a not in measured or measured[a].get("size") != list(size))]
    for arch in missing:  # a short timed run on the device at hand
        measured.update({r["arch"]: r for r in measure_models(
            [arch], size=size, in_channels=plan.channels, num_classes=plan.num_outputs,
            batch_size=plan.batch_size, steps=study.measure_steps,
            model_options=study.model_options.get(arch))})
    rows = []
    for arch in study.archs:
        if get_entry(arch).external:  # its own code builds its network: no size, no timing here
            rows.append({"arch": arch, "params_m": None, "gmacs": None, "size": f"{size[0]}x{size[1]}",
                         "train_img_s": None, "infer_img_s": None, "peak_mem_mb": None, "device": None})
            continue
        options = dict(study.model_options.get(arch) or {})
        if get_entry(arch).pretrained:
            options.setdefault("pretrained", False)
        model = build_model(arch, plan.channels, plan.num_outputs, **options)
        m = measured.get(arch, {})
        rows.append({"arch": arch, "params_m": count_parameters(model)["total"] / 1e6,
                     "gmacs": count_flops(model, plan.channels, size, device="cpu") / 2e9,
                     "size": f"{size[0]}x{size[1]}", "train_img_s": m.get("train_images_per_s"),
                     "infer_img_s": m.get("infer_images_per_s"), "peak_mem_mb": m.get("peak_memory_mb"),
                     "device": m.get("device")})
    return rows


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_study_report(study: Study) -> Path:
    """summary.csv/md/tex, ranking, plots (medplan_evaluate --all-folds) + study_report.md."""
    folds = completed_folds(study)
    df = gather_all_folds(datasets=study.datasets, archs=study.archs)
    write_reports(df)
    eff = efficiency_rows(study)
    lines = [f"# Study report ({dt.datetime.now().isoformat(timespec='seconds')})", "",
             f"Datasets: {', '.join(study.datasets)}; architectures: {', '.join(study.archs)}; "
             f"{len(folds)} of {sum(t.kind == 'fold' for t in tasks(study))} folds complete.", "",
             markdown(df), "", "## Efficiency", "",
             "| Architecture | Params (M) | GMACs | Size | Train img/s | Infer img/s | Peak GPU mem (MB) | Device |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for r in eff:
        lines.append(f"| {r['arch']} | {_cell(r['params_m'], '.2f')} | {_cell(r['gmacs'], '.2f')} | {r['size']} | "
                     f"{_cell(r['train_img_s'], '.1f')} | {_cell(r['infer_img_s'], '.1f')} | "
                     f"{_cell(r['peak_mem_mb'], '.0f')} | {r['device'] or '-'} |")
    root = results_root()
    path = root / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_json(root / REPORT_STATE, {"folds": folds, "efficiency": eff,
                                            "created": dt.datetime.now().isoformat(timespec="seconds")})
    build_report(table=df)  # RESULTS/report/index.html, after study_report.json so it shows the efficiency rows
    return path
