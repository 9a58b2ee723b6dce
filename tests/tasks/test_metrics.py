"""Metrics agree with independent references: hand-written pair loops, torchmetrics, lifelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_cohen_kappa,
    multiclass_f1_score,
)

from e2e_wsi.tasks import metrics as M


def _pairwise_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney statistic by a double loop over (positive, negative) pairs."""
    total, pairs = 0.0, 0
    for i in np.flatnonzero(positive):
        for j in np.flatnonzero(~positive):
            pairs += 1
            total += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return total / pairs


def _qwk_by_formula(labels: np.ndarray, preds: np.ndarray, k: int) -> float:
    observed = np.zeros((k, k))
    for y, p in zip(labels, preds, strict=True):
        observed[y, p] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    w = np.array([[(i - j) ** 2 / (k - 1) ** 2 for j in range(k)] for i in range(k)])
    return 1.0 - (w * observed).sum() / (w * expected).sum()


def _random_classification(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    # Rounding creates tied scores, which the references must handle the same way.
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)
    probs[:, -1] = 1.0 - probs[:, :-1].sum(1)
    return labels, probs, probs.argmax(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auroc_matches_pair_loop_and_torchmetrics(seed: int) -> None:
    labels, probs, _ = _random_classification(seed, 80, 2)
    got = M.auroc(labels, probs)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(_pairwise_auroc(labels == 1, probs[:, 1]), abs=1e-12)
    ref = binary_auroc(torch.tensor(probs[:, 1]), torch.tensor(labels)).item()
    assert got[0] == pytest.approx(ref, abs=1e-6)


def test_multiclass_auroc_is_macro_one_vs_rest() -> None:
    labels, probs, _ = _random_classification(3, 90, 4)
    got = M.auroc(labels, probs)[0]
    by_loop = np.mean([_pairwise_auroc(labels == c, probs[:, c]) for c in range(4)])
    ref = multiclass_auroc(torch.tensor(probs), torch.tensor(labels), num_classes=4, average="macro").item()
    assert got == pytest.approx(by_loop, abs=1e-12)
    assert got == pytest.approx(ref, abs=1e-6)


def test_auroc_undefined_without_both_classes() -> None:
    labels = np.array([1, 1, 0])
    probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    weights = np.array([[1, 1, 0], [2, 0, 1]])  # first resample holds positives only
    got = M.auroc(labels, probs, weights)
    assert np.isnan(got[0])
    assert got[1] == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 4])
def test_count_weights_equal_duplicated_rows(k: int) -> None:
    labels, probs, preds = _random_classification(4, 60, k)
    rng = np.random.default_rng(5)
    weights = rng.integers(0, 4, size=(3, 60))
    for r in range(3):
        rows = np.repeat(np.arange(60), weights[r])
        assert M.auroc(labels, probs, weights)[r] == pytest.approx(
            M.auroc(labels[rows], probs[rows])[0], abs=1e-12
        )
        for fn in (M.accuracy, M.balanced_accuracy, M.f1_macro, M.quadratic_weighted_kappa):
            batched = fn(labels, preds, k, weights)[r]
            assert batched == pytest.approx(fn(labels[rows], preds[rows], k)[0], abs=1e-12), fn.__name__


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_balanced_accuracy_f1_match_torchmetrics(seed: int) -> None:
    k = 5
    labels, _, _ = _random_classification(seed, 120, k)
    rng = np.random.default_rng(seed + 10)
    # Noisy predictions so that per-class recalls differ and balanced != plain accuracy.
    preds = np.where(rng.random(120) < 0.6, labels, rng.integers(0, k, 120))
    t_pred, t_lab = torch.tensor(preds), torch.tensor(labels)
    assert M.accuracy(labels, preds, k)[0] == pytest.approx(float((labels == preds).mean()))
    ref_bal = multiclass_accuracy(t_pred, t_lab, num_classes=k, average="macro").item()
    assert M.balanced_accuracy(labels, preds, k)[0] == pytest.approx(ref_bal, abs=1e-6)
    ref_f1 = multiclass_f1_score(t_pred, t_lab, num_classes=k, average="macro").item()
    assert M.f1_macro(labels, preds, k)[0] == pytest.approx(ref_f1, abs=1e-6)


def test_balanced_accuracy_and_f1_ignore_absent_classes() -> None:
    labels = np.array([0, 0, 0, 1])
    preds = np.array([0, 0, 1, 1])
    # Class 2 occurs nowhere: it must not pull the averages down.
    assert M.balanced_accuracy(labels, preds, 3)[0] == pytest.approx((2 / 3 + 1) / 2)
    assert M.f1_macro(labels, preds, 3)[0] == pytest.approx((0.8 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwk_matches_confusion_matrix_formula(seed: int) -> None:
    k = 6
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, 150)
    preds = np.clip(labels + rng.integers(-2, 3, 150), 0, k - 1)
    got = M.quadratic_weighted_kappa(labels, preds, k)[0]
    assert got == pytest.approx(_qwk_by_formula(labels, preds, k), abs=1e-12)
    ref = multiclass_cohen_kappa(
        torch.tensor(preds), torch.tensor(labels), num_classes=k, weights="quadratic"
    )
    assert got == pytest.approx(ref.item(), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_unweighted_kappa_matches_torchmetrics_official_ck(seed: int) -> None:
    # The official PANDA "CK" is torchmetrics CohenKappa(task="multiclass") without weights.
    k = 6
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, 150)
    preds = np.clip(labels + rng.integers(-2, 3, 150), 0, k - 1)
    got = M.unweighted_kappa(labels, preds, k)[0]
    ref = multiclass_cohen_kappa(torch.tensor(preds), torch.tensor(labels), num_classes=k)
    assert got == pytest.approx(ref.item(), abs=1e-5)
    assert abs(got - M.quadratic_weighted_kappa(labels, preds, k)[0]) > 0.05  # a different statistic


def test_qwk_undefined_when_everything_in_one_class() -> None:
    labels = np.array([2, 2, 2])
    assert np.isnan(M.quadratic_weighted_kappa(labels, labels, 4)[0])


def _survival(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 15, n).astype(float)  # few distinct values: many tied times
    event = rng.integers(0, 2, n)
    risk = np.round(-0.2 * time + rng.normal(size=n), 1)  # rounded: tied risks
    return time, event, risk


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_c_index_matches_lifelines_with_ties_and_censoring(seed: int) -> None:
    time, event, risk = _survival(seed, 120)
    assert len(np.unique(time)) < 120 and len(np.unique(risk)) < 120 and 0 < event.sum() < 120
    got = M.c_index(time, event, risk)[0]
    assert got == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)


def test_weighted_c_index_matches_lifelines_on_duplicated_rows() -> None:
    time, event, risk = _survival(7, 50)
    weights = np.random.default_rng(8).integers(0, 3, size=(4, 50))
    got = M.c_index(time, event, risk, weights)
    for r in range(4):
        rows = np.repeat(np.arange(50), weights[r])
        assert got[r] == pytest.approx(concordance_index(time[rows], -risk[rows], event[rows]), abs=1e-12)


def test_c_index_blocks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    time, event, risk = _survival(9, 70)
    weights = np.random.default_rng(1).integers(0, 3, size=(5, 70))
    whole = M.c_index(time, event, risk, weights)
    monkeypatch.setattr(M, "_PAIR_BLOCK_ELEMENTS", 70 * 3)  # 3 rows per block, last one partial
    np.testing.assert_allclose(M.c_index(time, event, risk, weights), whole, atol=1e-12)


def test_c_index_undefined_without_comparable_pairs() -> None:
    time = np.array([3.0, 5.0, 8.0])
    assert np.isnan(M.c_index(time, np.zeros(3), np.array([1.0, 2.0, 3.0]))[0])
    # Two events at the same time are not comparable either.
    assert np.isnan(M.c_index(np.array([4.0, 4.0]), np.ones(2), np.array([1.0, 2.0]))[0])


def test_bad_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        M.accuracy(np.array([0, 1]), np.array([0, 1]), 2, np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        M.accuracy(np.array([0, 1]), np.array([0, 1]), 2, np.array([[1, -1]]))
