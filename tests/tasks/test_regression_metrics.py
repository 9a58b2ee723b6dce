"""Regression metrics against references (scipy's pearsonr / spearmanr, numpy for MAE and R^2), the
bootstrap weights against explicitly duplicated rows, and the regression loss and task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from e2e_wsi.evaluation.bootstrap import bootstrap_report
from e2e_wsi.models.losses import RegressionLoss
from e2e_wsi.models.tasks import RegressionTask
from e2e_wsi.tasks.regression import mae, pearson_r, r2, spearman_rho


def reference(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The metrics as scipy and plain numpy compute them on one set of rows."""
    return {
        "pearson_r": stats.pearsonr(target, pred)[0],
        "spearman_rho": stats.spearmanr(target, pred)[0],
        "mae": np.mean(np.abs(target - pred)),
        "r2": 1.0 - np.sum((target - pred) ** 2) / np.sum((target - target.mean()) ** 2),
    }


OURS = {"pearson_r": pearson_r, "spearman_rho": spearman_rho, "mae": mae, "r2": r2}


def data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Targets and noisy predictions, rounded so both sides hold ties (Spearman's average ranks matter)."""
    rng = np.random.default_rng(seed)
    target = np.round(rng.normal(3.0, 1.5, n), 1)
    pred = np.round(target + rng.normal(0.0, 1.0, n), 0)
    return target, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_values_match_scipy_and_numpy(seed: int) -> None:
    target, pred = data(seed=seed)
    ref = reference(target, pred)
    for name, fn in OURS.items():
        assert fn({"target": target, "pred": pred})[0] == pytest.approx(ref[name], abs=1e-12), name


def test_resample_weights_equal_the_metric_on_duplicated_rows() -> None:
    target, pred = data(40, seed=3)
    weights = np.random.default_rng(4).integers(0, 4, size=(6, 40)).astype(np.float64)
    for name, fn in OURS.items():
        got = fn({"target": target, "pred": pred}, weights)
        for r in range(6):
            rows = np.repeat(np.arange(40), weights[r].astype(int))
            assert got[r] == pytest.approx(reference(target[rows], pred[rows])[name], abs=1e-12), (name, r)


def test_the_comparison_discriminates() -> None:
    """Self-checks: ordinal ranks (ties broken by order) and unweighted values differ from the references,
    so the tests above would catch a metric that ignored ties or weights."""
    target, pred = data(seed=0)
    ordinal = stats.pearsonr(stats.rankdata(target, "ordinal"), stats.rankdata(pred, "ordinal"))[0]
    assert abs(ordinal - stats.spearmanr(target, pred)[0]) > 1e-3
    weights = np.random.default_rng(4).integers(0, 4, size=(1, 60)).astype(np.float64)
    arrays = {"target": target, "pred": pred}
    for name, fn in OURS.items():
        assert abs(fn(arrays, weights)[0] - fn(arrays)[0]) > 1e-6, name


def test_undefined_on_constant_targets() -> None:
    arrays = {"target": np.full(5, 2.0), "pred": np.arange(5.0)}
    for name in ("pearson_r", "spearman_rho", "r2"):
        assert np.isnan(OURS[name](arrays)[0]), name
    assert mae(arrays)[0] == pytest.approx(np.mean(np.abs(2.0 - np.arange(5.0))))


def test_bootstrap_report_of_a_regression() -> None:
    import pandas as pd

    target, pred = data(200, seed=5)
    frame = pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(200)],
            "slide_id": [f"s{i}" for i in range(200)],
            "target": target,
            "pred": pred,
        }
    )
    report = bootstrap_report(frame, "regression", n_resamples=300, seed=1)
    assert list(report["metrics"]) == ["pearson_r", "spearman_rho", "mae", "r2"]
    for name, m in report["metrics"].items():
        assert m["n_valid"] == 300 and m["ci_low"] < m["point"] < m["ci_high"], name
        assert m["point"] == pytest.approx(reference(target, pred)[name], abs=1e-12), name


def test_regression_loss_and_task() -> None:
    pred, target = torch.tensor([0.0, 1.0, 4.0]), torch.tensor([0.5, 1.0, 0.0])
    assert float(RegressionLoss("mse")(pred, target)) == pytest.approx((0.25 + 0 + 16) / 3)
    # Huber with delta 1: 0.5 * 0.5^2 inside, 1 * (4 - 0.5) beyond.
    assert float(RegressionLoss("huber", 1.0)(pred, target)) == pytest.approx((0.125 + 0 + 3.5) / 3)
    with pytest.raises(ValueError, match="'mse' or 'huber'"):
        RegressionLoss("l1")
    with pytest.raises(ValueError, match="target_scale"):
        RegressionTask(target_scale=0)
    task = RegressionTask(target_offset=3.0, target_scale=2.0)
    outputs = torch.tensor([[0.0], [1.0]])
    assert task.predict(outputs)["pred"].tolist() == [3.0, 5.0]  # back in target units
    loss = task.loss(task.build_loss(), outputs, {"target": torch.tensor([3.0, 5.0])})
    assert float(loss) == 0.0  # targets standardised to the head's units before the loss
    head = task.build_head(16)
    assert head(torch.randn(4, 16)).shape == (4, 1) and head.fc.bias is not None
