"""Regression: a continuous target per slide (a biomarker score, a gene-expression value).

Manifest column ``target`` (a finite number); ``predictions.csv`` rows ``case_id,slide_id,target,pred``;
metrics Pearson r, Spearman rho, mean absolute error and R^2, each vectorised over bootstrap
resamples like :mod:`e2e_wsi.tasks.metrics` (count weights ``[R, n]``; a unit of weight c counts as c
copies, so a resample's value equals the metric of its duplicated rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from e2e_wsi.tasks import _checks as C
from e2e_wsi.tasks import register_task_spec
from e2e_wsi.tasks.base import Arrays, MetricDef, SynthCohort, TaskSpec
from e2e_wsi.tasks.metrics import as_weights, grouped_sums, safe_ratio

if TYPE_CHECKING:  # torch is imported by the methods that need it: `e2e-wsi synth` workers do not
    import torch


# ------------------------------------------------------------------------------------------ metrics
def _centred(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x`` ([n] or [R, n]) minus its weighted mean per resample: [R, n]."""
    mean = safe_ratio((w * x).sum(axis=1), w.sum(axis=1))
    return x - mean[:, None]


def weighted_pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation per resample of ``a`` and ``b`` ([n] or [R, n]) under weights ``w`` [R, n].

    ``NaN`` where either side is constant (zero variance), as ``scipy.stats.pearsonr``.
    """
    da, db = _centred(a, w), _centred(b, w)
    cov = (w * da * db).sum(axis=1)
    var = (w * da * da).sum(axis=1) * (w * db * db).sum(axis=1)
    return np.clip(safe_ratio(cov, np.sqrt(var)), -1.0, 1.0)


def weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """1-based average ranks of ``x`` [n] within each resample, ties (and copies) sharing their mean rank.

    Returns:
        [R, n]: the rank a unit's copies hold in resample ``r`` (units of weight 0 get a rank that
        never counts).
    """
    _, group = np.unique(x, return_inverse=True)
    counts = grouped_sums(w, group, int(group.max()) + 1 if len(x) else 1)  # [R, G] copies per value
    below = np.cumsum(counts, axis=1) - counts
    return (below + (counts + 1.0) / 2.0)[:, group]


def pearson_r(a: Arrays, weights: np.ndarray | None = None) -> np.ndarray:
    """Pearson r of predictions and targets, ``[R]``."""
    w = as_weights(weights, len(a["target"]))
    return weighted_pearson(a["target"], a["pred"], w)


def spearman_rho(a: Arrays, weights: np.ndarray | None = None) -> np.ndarray:
    """Spearman rho: Pearson r of the average ranks within each resample, ``[R]``."""
    w = as_weights(weights, len(a["target"]))
    return weighted_pearson(weighted_ranks(a["target"], w), weighted_ranks(a["pred"], w), w)


def mae(a: Arrays, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute error, ``[R]``."""
    w = as_weights(weights, len(a["target"]))
    return safe_ratio(w @ np.abs(a["target"] - a["pred"]), w.sum(axis=1))


def r2(a: Arrays, weights: np.ndarray | None = None) -> np.ndarray:
    """Coefficient of determination 1 - SS_res / SS_tot, ``[R]``.

    ``NaN`` where the targets are constant (SS_tot = 0); scikit-learn's ``r2_score`` returns 0 or 1
    there instead, a number that is not a fit quality.
    """
    w = as_weights(weights, len(a["target"]))
    ss_res = w @ (a["target"] - a["pred"]) ** 2
    ss_tot = (w * _centred(a["target"], w) ** 2).sum(axis=1)
    return 1.0 - safe_ratio(ss_res, ss_tot)


# ------------------------------------------------------------------------------------ synth cohort
def lesion_percent(rng: np.random.Generator, score: np.ndarray, burden: np.ndarray) -> dict[str, list[str]]:
    """Synthetic ``target``: the percentage of tissue the case's lesions cover (a tumour-content score),
    which grows with the case score; the painted slides carry that share of lesion."""
    return {"target": [f"{100.0 * b:.4f}" for b in burden]}


# -------------------------------------------------------------------------------------------- spec
@register_task_spec
class RegressionSpec(TaskSpec):
    """A continuous target per slide."""

    kind = "regression"
    description = "a continuous target per slide (a biomarker score); Pearson r, Spearman rho, MAE, R^2"
    manifest_columns = ("target",)
    truth_columns = ("target",)
    prediction_keys = ("pred",)
    main_prediction_column = "pred"
    main_metric = "pearson_r"
    metrics = (
        MetricDef("pearson_r", pearson_r),
        MetricDef("spearman_rho", spearman_rho),
        MetricDef("mae", mae),
        MetricDef("r2", r2),
    )
    synth_cohorts = (SynthCohort("regression", lesion_percent),)

    def parse_manifest(
        self,
        df: pd.DataFrame,
        errors: list[str],
        num_targets: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """``target``: a finite number."""
        values: list[float | None] = []
        for _, row in df.iterrows():
            value = C.parse_float(row["target"])
            if value is None:
                errors.append(f"{C.where(row)}: target {row['target']!r} must be a finite number")
            values.append(value)
        df["target"] = pd.array(values, dtype="Float64")

    def finish_manifest(self, df: pd.DataFrame) -> None:
        df["target"] = df["target"].astype("float64")

    def row_targets(self, row: Mapping[str, object]) -> dict[str, float | int]:
        return {"target": float(row["target"])}  # type: ignore[arg-type]

    def truth_row(self, targets: Mapping[str, float | int]) -> dict[str, float | int]:
        return {"target": float(targets["target"])}

    def train_targets(self, targets: list[Mapping[str, float | int]]) -> torch.Tensor:
        import torch

        return torch.tensor([t["target"] for t in targets], dtype=torch.float32)

    def batch_truth(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"target": batch["target"]}

    def prediction_columns(self, preds: Mapping[str, np.ndarray]) -> dict[str, list]:
        if "pred" not in preds:
            raise ValueError(f"regression predictions need 'pred' (got {sorted(preds)})")
        return {"pred": np.asarray(preds["pred"], dtype=np.float64).reshape(-1).tolist()}

    def validate_predictions(self, df: pd.DataFrame, source: str) -> pd.DataFrame:
        """``case_id,slide_id,target,pred``: finite numbers, one row per slide."""
        out = self._frame(df, ["target", "pred"], source)
        for col in ("target", "pred"):
            out[col] = C.as_numbers(out, col, source, integer=False)
        return out.reset_index(drop=True)

    def recognises(self, columns: set[str]) -> bool:
        return {"target", "pred"} <= columns and not any(c.startswith("prob_") for c in columns)

    def metric_arrays(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"target": df["target"].to_numpy(np.float64), "pred": df["pred"].to_numpy(np.float64)}

    def caption(self, prediction: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None) -> str:
        value = float(np.asarray(prediction["pred"], dtype=np.float64).reshape(-1)[0])
        return f"predicted value: {value:.3g}"
