"""What explain writes for one model: per case a panel PNG and ``CASE_cam.npz``; ``layer.json``,
``cases.csv``, ``pointing_game.csv`` (one row per case and class) and ``index.md``; and the
per-architecture pointing-game summary ``DATASET/ARCH/pointing_game.csv``."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from medplan.evaluation.aggregate import gather_pointing_game, pointing_game_summary
from medplan.explain.cases import CaseMaps
from medplan.explain.figures import figure_png, panel_figure, percent
from medplan.explain.model import ModelExplainer
from medplan.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from medplan.names import MAX_LENGTH

#: columns of ``pointing_game.csv`` (one row per case and foreground class)
POINTING_COLUMNS = ("dataset", "arch", "maps", "target", "layer", "case_id", "class_index", "class", "energy_in_gt",
                    "gt_fraction", "dice")


def safe_name(name: str) -> str:
    """A file name from a case id or folder name that follows the name rule (never ``..``)."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in str(name))
    if not safe or safe.startswith("."):
        safe = "_" + safe
    return safe[:MAX_LENGTH]


def merge_csv(path: Path, new: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Rows of an earlier run stay unless this run redid the same keys."""
    if path.is_file():
        try:
            old = pd.read_csv(path, keep_default_na=True)
        except Exception:
            old = pd.DataFrame(columns=new.columns)
        if not old.empty and all(k in old.columns for k in keys):
            done = set(map(tuple, new[list(keys)].astype(str).to_numpy()))
            keep = ~old[list(keys)].astype(str).apply(tuple, axis=1).isin(done)
            new = pd.concat([old[keep], new], ignore_index=True)
    return new


def pointing_rows(case: CaseMaps, *, dataset: str, arch: str, maps: str, target: str, layer: str,
                  class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One ``pointing_game.csv`` row per foreground class of an explained case."""
    rows = []
    for i in range(len(case.cams)):
        name = class_names[i + 1]
        rows.append({"dataset": dataset, "arch": arch, "maps": maps, "target": target, "layer": layer,
                     "case_id": case.case_id, "class_index": i + 1, "class": name,
                     "energy_in_gt": case.energy[i] if case.energy else np.nan,
                     "gt_fraction": case.gt_fraction[i] if case.gt_fraction else np.nan,
                     "dice": (case.dice.get("dice") or {}).get(name, np.nan) if case.dice else np.nan})
    return rows


def index_markdown(cases: pd.DataFrame, pointing: pd.DataFrame, title: str, layer: dict) -> str:
    """The index page: one line per case with its Dice and pointing-game values, worst first."""
    lines = [f"# {title}", "",
             f"Grad-CAM layer: `{layer.get('layer')}` ({layer.get('how')}, output {layer.get('output_shape')}); "
             f"target: {layer.get('target')}; folds: {', '.join(map(str, layer.get('folds', [])))}.", "",
             "Energy in GT: share of the class's CAM inside its ground-truth region "
             "(chance level: the region's share of the image).", ""]
    classes = sorted({(int(r.class_index), str(r["class"])) for _, r in pointing.iterrows()}) if len(pointing) else []
    head = ["Case", "mDSC", *[f"Dice {n}" for _, n in classes], *[f"Energy in GT {n}" for _, n in classes], "Panel"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = cases.assign(_m=pd.to_numeric(cases["mDSC"], errors="coerce")).sort_values(["_m", "case_id"],
                                                                                        na_position="last")
    for _, c in order.iterrows():
        p = pointing[pointing["case_id"].astype(str) == str(c["case_id"])]
        by = {int(r.class_index): r for _, r in p.iterrows()}
        dice = [percent(by[i]["dice"]) if i in by else "–" for i, _ in classes]
        energy = [percent(by[i]["energy_in_gt"]) if i in by else "–" for i, _ in classes]
        lines.append(f"| {c['case_id']} | {percent(c['mDSC'])} | " + " | ".join(dice + energy)
                     + f" | [{c['panel']}]({c['panel']}) |")
    return "\n".join(lines) + "\n"


def write_model_outputs(out_dir: Path, explainer: ModelExplainer, results: Iterable[CaseMaps], *, dataset: str,
                        maps: str, source: str) -> tuple[list[Path], list[dict[str, Any]]]:
    """Panels, CAM arrays, layer.json, cases.csv, pointing_game.csv and index.md of one model.

    ``results`` may be a generator: each case is written as soon as it is computed (50 cases at
    512 x 512 need not sit in memory). Returns the paths and this run's pointing-game rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = {**explainer.layers[0].as_dict(), "arch": explainer.arch, "dataset": dataset,
             "folds": [str(f) for f in explainer.folds], "fold_layers": [c.name for c in explainer.layers],
             "checkpoint": explainer.checkpoint, "target": explainer.target, "maps": maps,
             "method": "Grad-CAM (pytorch-grad-cam), per-class segmentation target, min-max scaled",
             "input_size": list(explainer.ensemble.input_size)}
    written = []
    case_rows, point_rows = [], []
    for case in results:
        stem = safe_name(case.case_id)
        title = f"{dataset} / {explainer.arch} ({maps}) — {case.case_id}"
        png = out_dir / f"{stem}.png"
        atomic_write_bytes(png, figure_png(panel_figure(case, explainer.class_names, title)))
        buf = io.BytesIO()
        np.savez_compressed(buf, cams=case.cams.astype(np.float16), classes=np.array(explainer.class_names[1:]))
        atomic_write_bytes(out_dir / f"{stem}_cam.npz", buf.getvalue())
        written.append(png)
        case_rows.append({"case_id": case.case_id, "source": source, "mDSC": case.dice.get("mDSC", np.nan),
                          "layer": layer["layer"], "target": explainer.target, "panel": png.name})
        point_rows += pointing_rows(case, dataset=dataset, arch=explainer.arch, maps=maps, target=explainer.target,
                                    layer=layer["layer"], class_names=explainer.class_names)
    cases = merge_csv(out_dir / "cases.csv", pd.DataFrame(case_rows), ["case_id"])
    pointing = merge_csv(out_dir / "pointing_game.csv", pd.DataFrame(point_rows, columns=list(POINTING_COLUMNS)),
                         ["case_id", "class_index"])
    atomic_write_json(out_dir / "layer.json", layer)
    atomic_write_bytes(out_dir / "cases.csv", cases.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "pointing_game.csv", pointing.to_csv(index=False).encode())
    atomic_write_text(out_dir / "index.md", index_markdown(cases, pointing, f"{dataset} / {explainer.arch}: "
                                                           f"Grad-CAM ({maps})", layer))
    return [*written, out_dir / "layer.json", out_dir / "pointing_game.csv", out_dir / "index.md"], point_rows


def write_arch_pointing_summaries(root: Path, dataset: str, archs: Sequence[str]) -> list[Path]:
    """``DATASET/ARCH/pointing_game.csv``: per class, over every explained case of the model."""
    written = []
    for arch in archs:
        df = gather_pointing_game(root, datasets=[dataset], archs=[arch])
        if df.empty:
            continue
        path = root / dataset / arch / "pointing_game.csv"
        atomic_write_bytes(path, pointing_game_summary(df).to_csv(index=False).encode())
        written.append(path)
    return written
