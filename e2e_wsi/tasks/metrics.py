"""Test metrics, vectorised over bootstrap resamples: the one implementation of each metric.

The bootstrap report (:mod:`e2e_wsi.evaluation.bootstrap`) and the validation metrics logged during
training (:class:`e2e_wsi.evaluation.torch_metrics.ReportMetric`) both call these functions, through the
task specs (:mod:`e2e_wsi.tasks`). Metrics of one task kind only may live in that kind's spec module.

Every metric takes the evaluated units (slides, or cases for survival) once and a weight matrix
``weights [R, n]``: row ``r`` holds how many times each unit appears in resample ``r``. Integer
count weights give exactly the metric of the resample with its duplicated rows, so one call scores
all ``R`` resamples with a few matrix products instead of ``R`` Python-level calls. ``weights=None``
means one resample holding every unit once (the point estimate).

Each function returns ``[R]`` float64 values, ``NaN`` where the metric is undefined for that
resample (for example AUROC when a class is absent, C-index without comparable pairs); the
bootstrap skips and counts those.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "as_weights",
    "auroc",
    "balanced_accuracy",
    "binary_auroc",
    "c_index",
    "cohen_kappa",
    "confusion_matrices",
    "f1_macro",
    "grouped_sums",
    "quadratic_weighted_kappa",
    "safe_ratio",
    "unweighted_kappa",
]

# Elements of a [block, n] pair matrix built at once in the C-index; bounds memory to ~32 MB.
_PAIR_BLOCK_ELEMENTS = 4_000_000


def as_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """Return resample weights as a float64 ``[R, n]`` matrix.

    Args:
        weights: ``[R, n]`` or ``[n]`` non-negative counts, or ``None`` for every unit once.
        n: Number of units.

    Returns:
        ``[R, n]`` float64 weights (``R == 1`` for ``None`` or a 1-D input).

    Raises:
        ValueError: If the shape does not match ``n`` or a weight is negative.
    """
    if weights is None:
        return np.ones((1, n), dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must have shape [R, {n}], got {list(np.shape(weights))}")
    if (w < 0).any():
        raise ValueError("weights must be non-negative counts")
    return w


def grouped_sums(weights: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Sum each resample's weights per group.

    Args:
        weights: ``[R, n]`` weights.
        groups: ``[n]`` group index of each unit in ``[0, num_groups)``.
        num_groups: Number of groups ``G``.

    Returns:
        ``[R, G]`` with ``out[r, g] = sum(weights[r, groups == g])``.
    """
    num_resamples, n = weights.shape
    if n == 0:
        return np.zeros((num_resamples, num_groups))
    # One flat bincount: resample r's groups live at offsets r * G .. r * G + G - 1.
    flat = (np.arange(num_resamples)[:, None] * num_groups + groups[None, :]).ravel()
    sums = np.bincount(flat, weights=weights.ravel(), minlength=num_resamples * num_groups)
    return sums.reshape(num_resamples, num_groups)


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``NaN`` where ``den == 0``."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def binary_auroc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted AUROC as the Mann-Whitney statistic (tied scores count one half).

    Args:
        positive: ``[n]`` bool, True for the positive class.
        scores: ``[n]`` scores, higher = more likely positive.
        weights: ``[R, n]`` resample counts, or ``None``.

    Returns:
        ``[R]`` AUROC; ``NaN`` where a resample holds no positive or no negative unit.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    w = as_weights(weights, len(scores))
    _, rank_group = np.unique(scores, return_inverse=True)
    num_groups = int(rank_group.max()) + 1 if len(scores) else 1
    # Weight of positives / negatives at each distinct score value, per resample: [R, G].
    pos = grouped_sums(w[:, positive], rank_group[positive], num_groups)
    neg = grouped_sums(w[:, ~positive], rank_group[~positive], num_groups)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return safe_ratio(num, pos.sum(axis=1) * neg.sum(axis=1))


def auroc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC: binary from ``probs[:, 1]``, macro one-vs-rest for more than two classes.

    Args:
        labels: ``[n]`` int class indices in ``[0, K)``.
        probs: ``[n, K]`` class probabilities.
        weights: ``[R, n]`` resample counts, or ``None``.

    Returns:
        ``[R]`` AUROC; ``NaN`` where a resample lacks a class (every class's one-vs-rest AUROC
        must be defined for the macro average, as in scikit-learn).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return binary_auroc(labels == 1, probs[:, 1], weights)
    per_class = [binary_auroc(labels == k, probs[:, k], weights) for k in range(probs.shape[1])]
    # Plain mean keeps NaN: a resample missing any class is undefined.
    return np.mean(np.stack(per_class, axis=1), axis=1)


def confusion_matrices(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Weighted confusion matrix of every resample.

    Args:
        labels: ``[n]`` true class indices in ``[0, K)``.
        preds: ``[n]`` predicted class indices in ``[0, K)``.
        num_classes: ``K``.
        weights: ``[R, n]`` resample counts, or ``None``.

    Returns:
        ``[R, K, K]`` with rows = true class, columns = predicted class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    w = as_weights(weights, len(labels))
    cells = grouped_sums(w, labels * num_classes + preds, num_classes * num_classes)
    return cells.reshape(w.shape[0], num_classes, num_classes)


def accuracy(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Top-1 accuracy per resample, ``[R]``."""
    cm = confusion_matrices(labels, preds, num_classes, weights)
    return safe_ratio(np.trace(cm, axis1=1, axis2=2), cm.sum(axis=(1, 2)))


def balanced_accuracy(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Mean per-class recall over the classes present in the resample's labels, ``[R]``."""
    cm = confusion_matrices(labels, preds, num_classes, weights)
    support = cm.sum(axis=2)
    recall = safe_ratio(np.diagonal(cm, axis1=1, axis2=2), support)
    present = support > 0
    return safe_ratio(np.where(present, recall, 0.0).sum(axis=1), present.sum(axis=1))


def f1_macro(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Macro F1 over the classes that occur in the labels or predictions of a resample, ``[R]``.

    Classes with no true and no predicted unit are left out of the average (as torchmetrics does)
    rather than counted as F1 = 0.
    """
    cm = confusion_matrices(labels, preds, num_classes, weights)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=2) + cm.sum(axis=1)  # 2 TP + FP + FN
    f1 = safe_ratio(2.0 * tp, denom)
    used = denom > 0
    return safe_ratio(np.where(used, f1, 0.0).sum(axis=1), used.sum(axis=1))


def cohen_kappa(
    labels: np.ndarray,
    preds: np.ndarray,
    num_classes: int,
    weights: np.ndarray | None = None,
    disagreement: str = "none",
) -> np.ndarray:
    """Cohen's kappa per resample, ``[R]``: unweighted (``disagreement="none"``) or quadratic.

    Unweighted kappa is the official PANDA "CK" (torchmetrics ``CohenKappa(task="multiclass")``,
    ``engines/metrics.py:150`` of DearCaat/E2E-WSI-ABMILX); quadratic weights ``(i - j)^2 / (K - 1)^2``
    give the PANDA challenge's QWK. ``NaN`` where the expected disagreement is zero (labels and
    predictions all in one class), where kappa is 0 / 0.
    """
    if disagreement not in ("none", "quadratic"):
        raise ValueError(f"disagreement must be 'none' or 'quadratic', got {disagreement!r}")
    cm = confusion_matrices(labels, preds, num_classes, weights)
    idx = np.arange(num_classes, dtype=np.float64)
    if disagreement == "quadratic":
        cost = (idx[:, None] - idx[None, :]) ** 2 / max(num_classes - 1, 1) ** 2
    else:
        cost = (idx[:, None] != idx[None, :]).astype(np.float64)
    total = cm.sum(axis=(1, 2))
    expected = safe_ratio(cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :], total[:, None, None])
    observed_d = (cm * cost).sum(axis=(1, 2))
    expected_d = (np.nan_to_num(expected) * cost).sum(axis=(1, 2))
    return 1.0 - safe_ratio(observed_d, expected_d)


def quadratic_weighted_kappa(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Cohen's kappa with quadratic disagreement weights, ``[R]`` (see :func:`cohen_kappa`)."""
    return cohen_kappa(labels, preds, num_classes, weights, "quadratic")


def unweighted_kappa(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """Cohen's kappa without disagreement weights (the official PANDA "CK"), ``[R]``."""
    return cohen_kappa(labels, preds, num_classes, weights, "none")


def c_index(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Harrell's C-index with lifelines' ``concordance_index(time, -risk, event)`` semantics.

    A pair (i, j) is comparable when unit i had the event and left first: ``t_i < t_j``, or
    ``t_i == t_j`` with j censored (two events at the same time are not comparable). It is
    concordant when ``risk_i > risk_j`` and counts one half when the risks tie. With weights, the
    pair counts ``w_i * w_j`` times, which equals lifelines on the resample's duplicated rows
    (copies of one unit are never comparable with each other).

    Args:
        time: ``[n]`` follow-up times.
        event: ``[n]`` 1 if the event was observed, 0 if censored.
        risk: ``[n]`` predicted risk, higher = shorter expected survival.
        weights: ``[R, n]`` resample counts, or ``None``.

    Returns:
        ``[R]`` C-index; ``NaN`` where a resample has no comparable pair.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=np.float64)
    n = len(time)
    w = as_weights(weights, n)
    num = np.zeros(w.shape[0])
    den = np.zeros(w.shape[0])
    block = max(1, _PAIR_BLOCK_ELEMENTS // max(n, 1))
    # Pairs are built block of rows by block so memory stays O(block * n) for large cohorts;
    # each block adds sum_i w[:, i] * sum_j M[i, j] w[:, j] as one matrix product.
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        t_i, t_j = time[rows, None], time[None, :]
        comparable = event[rows, None] & ((t_i < t_j) | ((t_i == t_j) & ~event[None, :]))
        r_i, r_j = risk[rows, None], risk[None, :]
        score = np.where(r_i > r_j, 1.0, np.where(r_i == r_j, 0.5, 0.0)) * comparable
        w_rows = w[:, rows]
        den += (w_rows * (w @ comparable.T.astype(np.float64))).sum(axis=1)
        num += (w_rows * (w @ score.T)).sum(axis=1)
    return safe_ratio(num, den)
