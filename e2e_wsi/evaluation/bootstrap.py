"""Case-level bootstrap reports and paired comparisons of two runs.

A resample draws ``n_cases`` case ids with replacement (seeded ``numpy.random.default_rng``) and
takes all rows of each drawn case, so the slides of one patient always move together. It is stored
as a count matrix ``weights [R, n_units]`` and every metric scores all resamples at once (the task
spec's metric functions, see :mod:`e2e_wsi.tasks.metrics`). The CI is the percentile interval of the
resamples in which the metric is defined; the others are skipped and counted (``n_valid``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from e2e_wsi.evaluation.report import validate_predictions
from e2e_wsi.tasks import get_task_spec, task_specs
from e2e_wsi.tasks.base import MetricDef

MetricFn = Callable[[pd.DataFrame, np.ndarray], np.ndarray]

# Bound on the [R_chunk, n_units] weight matrix held at once (float64, ~32 MB).
_CHUNK_ELEMENTS = 4_000_000


def __getattr__(name: str) -> Any:
    if name == "MAIN_METRIC":  # the metric each task is compared on, from the task specs
        return {kind: spec.main_metric for kind, spec in task_specs().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _on_frame(kind: str, metric: MetricDef) -> MetricFn:
    spec = get_task_spec(kind)

    def score(df: pd.DataFrame, w: np.ndarray) -> np.ndarray:
        return metric.fn(spec.metric_arrays(df), w)

    return score


def metric_functions(task: str) -> dict[str, MetricFn]:
    """The metrics reported for ``task`` (its spec's), in report order.

    Each maps ``(validated predictions, weights [R, n]) -> [R]`` values (``NaN`` = undefined).

    Raises:
        ValueError: For an unknown task.
    """
    return {m.name: _on_frame(task, m) for m in get_task_spec(task).metrics}


def case_codes(df: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Map each row's ``case_id`` to ``0 .. n_cases-1`` (order of first appearance).

    Returns:
        ``(codes [n_units] int64, n_cases)``.
    """
    codes, uniques = pd.factorize(df["case_id"].astype(str), sort=False)
    return codes.astype(np.int64), len(uniques)


def draw_cases(n_cases: int, n_resamples: int, seed: int) -> np.ndarray:
    """Case indices of every resample: ``[R, n_cases]`` int64 drawn uniformly with replacement."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_cases, size=(n_resamples, n_cases))


def draws_to_weights(draws: np.ndarray, codes: np.ndarray, n_cases: int) -> np.ndarray:
    """Turn drawn case indices ``[R, n_cases]`` into unit counts ``[R, n_units]`` (float64).

    A unit's count is its case's count, so all slides of a case move together.
    """
    num = draws.shape[0]
    flat = (draws + np.arange(num)[:, None] * n_cases).ravel()
    case_counts = np.bincount(flat, minlength=num * n_cases).reshape(num, n_cases)
    return case_counts[:, codes].astype(np.float64)


def resample_weights(case_ids: Any, n_resamples: int, seed: int) -> np.ndarray:
    """Case-level bootstrap weights for units labelled with ``case_ids``.

    Args:
        case_ids: ``[n_units]`` case id of each unit (several units may share a case).
        n_resamples: ``R``.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``[R, n_units]`` float64 counts; row sums over distinct cases equal ``n_cases``.
    """
    codes, n_cases = case_codes(pd.DataFrame({"case_id": list(case_ids)}))
    return draws_to_weights(draw_cases(n_cases, n_resamples, seed), codes, n_cases)


def _weight_chunks(draws: np.ndarray, codes: np.ndarray, n_cases: int) -> Iterator[np.ndarray]:
    step = max(1, _CHUNK_ELEMENTS // max(len(codes), 1))
    for start in range(0, draws.shape[0], step):
        yield draws_to_weights(draws[start : start + step], codes, n_cases)


def _point(fn: MetricFn, df: pd.DataFrame) -> float:
    return float(fn(df, np.ones((1, len(df))))[0])


def summarize(point: float, values: np.ndarray, ci: float = 0.95) -> dict[str, Any]:
    """Summary of one metric's bootstrap distribution.

    Args:
        point: Metric on the full data (``NaN`` if undefined).
        values: ``[R]`` per-resample values, ``NaN`` for undefined resamples.
        ci: Central coverage of the percentile interval.

    Returns:
        ``{"point", "mean", "std", "ci_low", "ci_high", "n_valid"}``; ``std`` uses ``ddof=1``;
        statistics are ``NaN`` when fewer resamples than they need are valid.
    """
    valid = values[np.isfinite(values)]
    alpha = (1.0 - ci) / 2.0
    out: dict[str, Any] = {"point": float(point), "mean": float("nan"), "std": float("nan")}
    out["ci_low"], out["ci_high"] = float("nan"), float("nan")
    if len(valid):
        out["mean"] = float(valid.mean())
        out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(valid, [alpha, 1.0 - alpha]))
    if len(valid) > 1:
        out["std"] = float(valid.std(ddof=1))
    out["n_valid"] = int(len(valid))
    return out


def _check_args(n_resamples: int, ci: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def bootstrap_values(
    df: pd.DataFrame, fns: dict[str, MetricFn], n_resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Every metric on every case-level resample of a validated frame: ``{name: [R]}``."""
    codes, n_cases = case_codes(df)
    draws = draw_cases(n_cases, n_resamples, seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    for weights in _weight_chunks(draws, codes, n_cases):
        for name, fn in fns.items():
            parts[name].append(fn(df, weights))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def bootstrap_report(
    predictions: pd.DataFrame, task: str, n_resamples: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, Any]:
    """Point estimates and case-level bootstrap statistics of the task's metrics.

    Args:
        predictions: Frame in the ``predictions.csv`` layout (validated here).
        task: A task kind; its spec lists the metrics (classification: auroc, accuracy,
            balanced_accuracy, f1_macro; grading: accuracy, qwk, balanced_accuracy; survival: c_index;
            regression: pearson_r, spearman_rho, mae, r2).
        n_resamples: Number of bootstrap resamples ``R``.
        seed: Seed of the resampling; equal seeds give identical reports.
        ci: Coverage of the percentile interval.

    Returns:
        ``{"task", "n", "n_cases", "bootstrap": {"n_resamples", "seed", "ci", "unit": "case"},
        "metrics": {name: {"point", "mean", "std", "ci_low", "ci_high", "n_valid"}}}`` where ``n``
        is the number of rows (slides, or cases for survival). Undefined values are ``NaN``
        (``null`` once written by :func:`e2e_wsi.evaluation.report.write_report`).
    """
    _check_args(n_resamples, ci)
    df = validate_predictions(predictions, task)
    fns = metric_functions(task)
    values = bootstrap_values(df, fns, n_resamples, seed)
    return {
        "task": task,
        "n": int(len(df)),
        "n_cases": case_codes(df)[1],
        "bootstrap": {"n_resamples": int(n_resamples), "seed": int(seed), "ci": float(ci), "unit": "case"},
        "metrics": {name: summarize(_point(fn, df), values[name], ci) for name, fn in fns.items()},
    }


def align_runs(a: pd.DataFrame, b: pd.DataFrame, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate two runs' predictions and order ``b``'s rows like ``a``'s, unit by unit.

    Units are matched on the spec's unit column (``slide_id``; ``case_id`` for survival).

    Raises:
        ValueError: If the runs hold different units, map a slide to different cases, or disagree
            on the ground truth (labels, times, events) or the number of classes.
    """
    a = validate_predictions(a, task, "run A")
    b = validate_predictions(b, task, "run B")
    spec = get_task_spec(task)
    key = spec.unit_column
    only_a = sorted(set(a[key]) - set(b[key]))
    only_b = sorted(set(b[key]) - set(a[key]))
    if only_a or only_b:
        raise ValueError(
            f"the two runs hold different {key}s: {len(only_a)} only in A (e.g. {only_a[:3]}), "
            f"{len(only_b)} only in B (e.g. {only_b[:3]}); compare predictions on the same test set"
        )
    b = b.set_index(key).loc[a[key]].reset_index()[list(b.columns)]
    truth = [*(c for c in spec.id_columns if c != key), *spec.truth_columns]
    if list(a.columns) != list(b.columns):  # e.g. prob_0 .. prob_{K-1} with another K
        raise ValueError(f"run A has columns {list(a.columns)} and run B {list(b.columns)}")
    for col in truth:
        differ = a[col].to_numpy() != b[col].to_numpy()
        if differ.any():
            unit = a[key].iloc[int(np.flatnonzero(differ)[0])]
            raise ValueError(
                f"the runs disagree on {col} for {key} {unit!r}: {int(differ.sum())} unit(s) differ"
            )
    return a, b


def paired_comparison(
    a: pd.DataFrame,
    b: pd.DataFrame,
    task: str,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    metric: str | None = None,
) -> dict[str, Any]:
    """Paired case-level bootstrap of ``metric(A) - metric(B)`` on the same resampled cases.

    Args:
        a: Predictions of run A.
        b: Predictions of run B on the same units.
        task: The task of both runs.
        n_resamples: ``R``.
        seed: Resampling seed.
        ci: Coverage of the percentile interval.
        metric: Metric to compare; defaults to the spec's ``main_metric``.

    Returns:
        ``{"task", "metric", "n", "n_cases", "bootstrap", "a": summary, "b": summary,
        "difference": summary + {"definition": "a - b", "share_le_0", "p_value"}}`` where
        ``share_le_0`` is the share of valid resamples with ``A - B <= 0`` and ``p_value`` the
        two-sided bootstrap p-value ``min(1, 2 * min(share <= 0, share >= 0))``.
    """
    _check_args(n_resamples, ci)
    a, b = align_runs(a, b, task)
    spec = get_task_spec(task)
    name = metric or spec.main_metric
    fn = _on_frame(task, spec.metric(name))
    values_a = bootstrap_values(a, {name: fn}, n_resamples, seed)[name]
    values_b = bootstrap_values(b, {name: fn}, n_resamples, seed)[name]
    diff = values_a - values_b  # NaN where either run is undefined: skipped in both.
    valid = diff[np.isfinite(diff)]
    point_a, point_b = _point(fn, a), _point(fn, b)
    difference = {"definition": "a - b", **summarize(point_a - point_b, diff, ci)}
    share_le = float((valid <= 0).mean()) if len(valid) else float("nan")
    share_ge = float((valid >= 0).mean()) if len(valid) else float("nan")
    difference["share_le_0"] = share_le
    difference["p_value"] = min(1.0, 2.0 * min(share_le, share_ge)) if len(valid) else float("nan")
    return {
        "task": task,
        "metric": name,
        "n": int(len(a)),
        "n_cases": case_codes(a)[1],
        "bootstrap": {"n_resamples": int(n_resamples), "seed": int(seed), "ci": float(ci), "unit": "case"},
        "a": summarize(point_a, values_a, ci),
        "b": summarize(point_b, values_b, ci),
        "difference": difference,
    }


# Upper bound on bootstrap resamples: percentile CIs are stable to the third decimal after a few thousand
# resamples, and the case draws alone take 8 * R * n_cases bytes, so 1e10 resamples would need TiBs.
MAX_RESAMPLES = 100_000
_MAX_DRAW_BYTES = 2 * 1024**3


def check_resamples(n_resamples: int, n_cases: int | None = None) -> int:
    """Validate a user's resample count before anything is allocated.

    Args:
        n_resamples: Requested ``R``.
        n_cases: Cases in the file, when known (bounds the ``[R, n_cases]`` draw array to 2 GiB).

    Returns:
        ``n_resamples``.

    Raises:
        ValueError: If ``R`` is below 1, above :data:`MAX_RESAMPLES`, or its draws would exceed 2 GiB.
    """
    if not 1 <= n_resamples <= MAX_RESAMPLES:
        raise ValueError(
            f"--bootstrap must be between 1 and {MAX_RESAMPLES:,} resamples, got {n_resamples:,} "
            "(1000-10000 give stable 95% intervals)"
        )
    if n_cases is not None and 8 * n_resamples * n_cases > _MAX_DRAW_BYTES:
        most = max(1, _MAX_DRAW_BYTES // (8 * max(n_cases, 1)))
        raise ValueError(
            f"--bootstrap {n_resamples:,} over {n_cases:,} cases needs "
            f"{8 * n_resamples * n_cases / 1024**3:.1f} GiB of draws; use at most {most:,}"
        )
    return n_resamples
