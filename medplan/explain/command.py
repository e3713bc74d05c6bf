"""The whole ``medplan_explain`` command: check the request, explain each job's cases (writing
each as it is computed), then the Fig.-1 grid across architectures and the pointing-game
summaries."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from medplan.architectures import get_entry, is_model
from medplan.errors import MedplanError
from medplan.explain.cases import CaseMaps, raw_case_files, read_case_label
from medplan.explain.figures import figure_png, grid_figure, percent
from medplan.explain.model import TARGETS, ModelExplainer
from medplan.explain.outputs import POINTING_COLUMNS, safe_name, write_arch_pointing_summaries, write_model_outputs
from medplan.explain.request import ExplainRequest, plan_jobs
from medplan.inference import list_images
from medplan.io import atomic_write_bytes, atomic_write_text, case_stem, read_image
from medplan.names import check_fold, check_name, check_names
from medplan.paths import results_root
from medplan.progress import progress_bar

#: the Fig.-1 grids of a dataset: ``DATASET/explain_grid/``
GRID_DIR = "explain_grid"


def _check_names(req: ExplainRequest) -> None:
    """Every name that becomes part of a path, before anything is read or written."""
    if not req.archs:
        raise MedplanError("name at least one architecture (-a)")
    check_name(req.dataset, "dataset name")
    check_names(req.archs, "architecture name")
    for arch in req.archs:
        if is_model(arch) and get_entry(arch).external:
            raise MedplanError(f"medplan_explain does not apply to {arch}: its network is built and run by "
                               f"{get_entry(arch).external}'s own code, not by medplan, so there is no layer to "
                               "take Grad-CAM from")
    for fold in req.folds or []:
        check_fold(fold)
    check_names(req.cases or [], "case id")
    if req.target not in TARGETS:
        raise MedplanError(f"--target must be one of {', '.join(TARGETS)}, got {req.target!r}")


def explain(req: ExplainRequest) -> dict[str, Any]:
    """Run a request: per model its explain folder; with several architectures, the Fig.-1 grid.

    Returns ``{"written": [paths], "layers": {arch: layer}, "pointing": DataFrame}``.
    """
    root = Path(req.results_root) if req.results_root is not None else results_root()
    _check_names(req)
    images = list_images(req.images) if req.images else None
    jobs = plan_jobs(req, root)
    explainers = {id(j): ModelExplainer(j.fold_dirs, checkpoint=req.checkpoint, device=req.device, layer=req.layer,
                                        target=req.target) for j in jobs}
    # the layer of every model (and a common label set for the grid) is checked before the first file is written
    for j in jobs:
        ex = explainers[id(j)]
        if not images and not j.cases:
            raise MedplanError(f"no case to explain for {j.arch} ({j.maps})", j.out_dir.parent)
        sample = read_image(images[0] if images else raw_case_files(ex.plan, req.dataset, j.cases[0])[0])
        ex.choose_layers(np.asarray(sample))
    names = {tuple(ex.class_names) for ex in explainers.values()}
    if len(req.archs) > 1 and len(names) > 1:
        raise MedplanError(f"the architectures of {req.dataset} were trained with different labels; no common grid")
    written: list[Path] = []
    by_case: dict[str, list[tuple[str, CaseMaps, ModelExplainer]]] = {}
    all_points = []
    total = sum(len(images) if images else len(j.cases) for j in jobs)
    bar = iter(progress_bar(range(total), total=total, desc="explain", enabled=req.progress))
    for j in jobs:
        ex = explainers[id(j)]
        items = [(case_stem(p), p, None) for p in images] if images else \
            [(c, *raw_case_files(ex.plan, req.dataset, c)) for c in j.cases]

        def run(items=items, ex=ex, j=j) -> Iterator[CaseMaps]:
            for case_id, image_path, label_path in items:
                gt = None
                if label_path is not None:
                    if not Path(label_path).is_file():
                        raise MedplanError(f"ground truth of case {case_id!r} not found", label_path)
                    gt = read_case_label(Path(label_path))
                res = ex.explain(case_id, read_image(image_path), gt, j.per_case.get(case_id))
                if len(req.archs) > 1:  # kept for the grid
                    by_case.setdefault(case_id, []).append((j.arch, res, ex))
                next(bar, None)
                yield res

        paths, points = write_model_outputs(j.out_dir, ex, run(), dataset=req.dataset, maps=j.maps, source=j.source)
        written += paths
        all_points += points
    if len(req.archs) > 1:
        written += write_grids(root, req, by_case)
    pointing = pd.DataFrame(all_points, columns=list(POINTING_COLUMNS))
    if not pointing.empty and not images:
        written += write_arch_pointing_summaries(root, req.dataset, req.archs)
    return {"written": written, "layers": {j.arch: explainers[id(j)].layers[0].name for j in jobs},
            "pointing": pointing}


def write_grids(root: Path, req: ExplainRequest, by_case: dict[str, list[tuple[str, CaseMaps, ModelExplainer]]]
                ) -> list[Path]:
    """``DATASET/explain_grid/CASE.png`` (rows: architectures) and its ``index.md``."""
    out = Path(req.output) / "grid" if req.output else root / req.dataset / GRID_DIR
    written, lines = [], [f"# {req.dataset}: Grad-CAM across architectures", "",
                          f"Rows: {', '.join(req.archs)}; target: {req.target}; "
                          f"maps: {'mean over folds' if req.mean_over_folds else 'the fold that validated the case'}.",
                          "", "| Case | " + " | ".join(f"mDSC {a}" for a in req.archs) + " | Grid |",
                          "|" + "---|" * (len(req.archs) + 2)]
    for case_id, entries in by_case.items():
        rows = [(arch, res) for arch, res, _ in entries]
        names = entries[0][2].class_names
        png = out / f"{safe_name(case_id)}.png"
        atomic_write_bytes(png, figure_png(grid_figure(rows, names, f"{req.dataset} — {case_id}")))
        written.append(png)
        dsc = {arch: res.dice.get("mDSC") for arch, res in rows}
        lines.append(f"| {case_id} | " + " | ".join(percent(dsc.get(a)) for a in req.archs)
                     + f" | [{png.name}]({png.name}) |")
    atomic_write_text(out / "index.md", "\n".join(lines) + "\n")
    return [*written, out / "index.md"]
