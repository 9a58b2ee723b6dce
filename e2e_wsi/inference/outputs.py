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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from e2e_wsi.evaluation.report import attention_table
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


def predictions_frame(preds: list[SlidePrediction], task_kind: str) -> pd.DataFrame:
    """``predictions.csv`` of new slides: ``slide_id`` and the task spec's prediction columns (no truth
    columns: the slides have no labels)."""
    spec = get_task_spec(task_kind)
    if not preds:
        return pd.DataFrame(columns=["slide_id", spec.main_prediction_column])
    values = {
        k: np.stack([np.asarray(p.preds[k], dtype=np.float64) for p in preds]) for k in spec.prediction_keys
    }
    return pd.DataFrame({"slide_id": [p.slide_id for p in preds], **spec.prediction_columns(values)})
