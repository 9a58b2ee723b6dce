"""Files ``e2e-wsi predict`` writes, each written to a temporary name and renamed (never half-written).

``OUT/predictions.csv``  ``slide_id`` and the task's prediction columns: ``pred,prob_0,...`` (classification,
                          grading), ``risk`` (survival), ``pred`` (regression)
``OUT/attention/<slide_id>.csv``  one row per patch: level-0 ``x,y``, ``size_level0``, ``magnification``,
                          ``attention`` (mean over heads), ``attention_head_<h>``
``OUT/<slide_id>.geojson``  patches + tissue contours for QuPath (:mod:`e2e_wsi.annotations.geojson`)
``OUT/heatmaps/<slide_id>.png``  the attention heatmap
``OUT/summary.json``  checkpoints used, task, and every slide's status (failures with their reason)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from e2e_wsi.errors import UserError
from e2e_wsi.evaluation.report import attention_table
from e2e_wsi.locks import FolderLock
from e2e_wsi.tasks import get_task_spec

if TYPE_CHECKING:  # also written for exported models (predict --onnx), which must not import Lightning
    from e2e_wsi.inference.predict import SlidePrediction


def _replace(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` as CSV, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    return _replace(tmp, path)


def write_json(data: dict[str, Any], path: Path) -> Path:
    """``data`` as indented JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    return _replace(tmp, path)


def attention_frame(pred: SlidePrediction) -> pd.DataFrame:
    """One row per patch with its level-0 square and attention (mean and per head): the layout of
    :func:`e2e_wsi.evaluation.report.attention_table`, shared with ``predict --config``."""
    att = pred.attention
    return attention_table(att.coords, pred.size_level0, pred.magnification, att.attention)


def predictions_frame(
    preds: list[SlidePrediction], task_kind: str, class_names: list[str] | None = None
) -> pd.DataFrame:
    """``predictions.csv`` of new slides: ``slide_id`` and the task spec's prediction columns (no truth
    columns: the slides have no labels).

    With ``class_names`` (the run's ``data.class_names``), ``pred_class`` after ``pred`` names the
    predicted class, so the file says which class each ``prob_k`` column is."""
    spec = get_task_spec(task_kind)
    if not preds:
        return pd.DataFrame(columns=["slide_id", spec.main_prediction_column])
    values = {
        k: np.stack([np.asarray(p.preds[k], dtype=np.float64) for p in preds]) for k in spec.prediction_keys
    }
    frame = pd.DataFrame({"slide_id": [p.slide_id for p in preds], **spec.prediction_columns(values)})
    if class_names and spec.has_classes and "pred" in frame:
        frame.insert(2, "pred_class", [class_names[int(k)] for k in frame["pred"]])
    return frame


# ------------------------------------------------------------------------------- an existing --out

OutMode = Literal["new", "overwrite", "add"]
OUT_MODES: tuple[str, ...] = ("new", "overwrite", "add")
_LOCK = ".predict.lock"
_OUTPUTS = ("predictions.csv", "summary.json", "attention", "heatmaps")  # plus <slide_id>.geojson


def out_lock(out: Path) -> FolderLock:
    """The lock one ``predict`` holds on its output folder (a second one is refused, naming the holder)."""
    return FolderLock(
        out / _LOCK,
        what=f"output folder {out}",
        holder="another `e2e-wsi predict`",
        advice="use another --out",
    )


def previous_outputs(out: Path, cache_dir: Path | None = None) -> list[Path]:
    """Entries of ``out`` besides its lock and the tiling cache (``OUT/cache``, re-used on purpose)."""
    if not out.is_dir():
        return []
    keep = {_LOCK, "cache"} if cache_dir is None else {_LOCK}
    skip = None if cache_dir is None else cache_dir.resolve()
    return sorted(p for p in out.iterdir() if p.name not in keep and p.resolve() != skip)


def prepare_out(out: Path, mode: OutMode, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """Check (and for ``overwrite``, clear) the output folder before predicting; call under :func:`out_lock`.

    Args:
        out: The output folder.
        mode: ``new`` refuses a folder holding anything; ``overwrite`` deletes the previous outputs
            (predictions, summary, attention, heatmaps, GeoJSON; never other files); ``add`` keeps them
            and merges the new slides in (see :func:`merge_predictions`).
        cache_dir: A tiling cache inside ``out`` that is not an output.

    Returns:
        The previous ``summary.json`` for ``add`` (``None`` when there is none or for other modes).

    Raises:
        UserError: For ``new`` with a non-empty folder, or ``add`` with a broken previous summary.
    """
    found = previous_outputs(out, cache_dir)
    if mode == "new" and found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserError(
            f"output folder {out} is not empty ({names}); pass --overwrite to replace its predictions, "
            "--add to add these slides to them, or choose another --out"
        )
    if mode == "overwrite":
        for path in found:
            if path.name in _OUTPUTS and path.is_dir():
                shutil.rmtree(path)
            elif path.name in _OUTPUTS or path.suffix == ".geojson":
                path.unlink()
        return None
    summary = out / "summary.json"
    if mode != "add" or not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text())
    except (ValueError, OSError) as err:
        raise UserError(
            f"{summary} cannot be read ({err}); --add needs it: use --overwrite instead"
        ) from None


def merge_previous(
    previous: dict[str, Any] | None, summary: dict[str, Any], out: Path
) -> pd.DataFrame | None:
    """For ``--add``: check that the previous run used the same model, and merge its slides into ``summary``.

    Slides predicted now replace earlier rows of the same id (one row per slide); others are kept.

    Returns:
        The previous ``predictions.csv`` rows of the slides not predicted now (``None`` if none).

    Raises:
        UserError: If the previous outputs came from other checkpoints, another task or class list.
    """
    if previous is None:
        return None
    for key in ("task", "checkpoints", "class_names"):
        if previous.get(key) != summary.get(key):
            raise UserError(
                f"{out / 'summary.json'} holds predictions with {key} {previous.get(key)}, this run has "
                f"{summary.get(key)}; --add only adds slides predicted by the same model: use another --out"
            )
    now = {s["slide_id"] for s in summary["slides"]}
    kept = [s for s in previous.get("slides", []) if s.get("slide_id") not in now]
    summary["slides"] = kept + summary["slides"]
    summary["counts"] = {k: sum(s["status"] == k for s in summary["slides"]) for k in ("ok", "failed")}
    csv = out / "predictions.csv"
    if not csv.is_file():
        return None
    old = pd.read_csv(csv, dtype={"slide_id": str})
    return old[~old["slide_id"].isin(now)]
