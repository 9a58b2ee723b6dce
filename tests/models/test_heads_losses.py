"""Heads, classification/survival/Cox losses and the survival helpers, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from e2e_wsi.models.heads import ClassificationHead, SurvivalHead
from e2e_wsi.models.losses import (
    ClassificationLoss,
    CoxLoss,
    DiscreteTimeSurvivalLoss,
    hazards_to_risk,
    survival_bins,
    time_to_bin,
)


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_heads_shapes_and_validation() -> None:
    slide = torch.randn(3, 20)
    assert ClassificationHead(in_dim=20, num_classes=5)(slide).shape == (3, 5)
    assert SurvivalHead(in_dim=20)(slide).shape == (3, 4)
    assert SurvivalHead(in_dim=20, num_bins=1, dropout=0.1)(slide).shape == (3, 1)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationHead(in_dim=20, num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        SurvivalHead(in_dim=20, dropout=1.0)


def test_weighted_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 1])
    weights = [1.0, 3.0, 0.5]
    # Weighted mean: sum_i w_{y_i} * (-log p_i[y_i]) / sum_i w_{y_i}.
    nll0 = -(2.0 - math.log(math.exp(2.0) + 2.0))
    nll1 = -(1.0 - math.log(1.0 + math.exp(1.0) + math.exp(3.0)))
    expected = (1.0 * nll0 + 3.0 * nll1) / (1.0 + 3.0)
    loss = ClassificationLoss(class_weights=weights)(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        ClassificationLoss(class_weights=weights)(torch.zeros(2, 4), target)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_discrete_time_nll_three_cases_by_hand(alpha: float) -> None:
    # Case A: hazards (0.5, 0.5, 0.5), event in bin 1    -> -[log S_0 + log h_1] = -[log 0.5 + log 0.5]
    # Case B: hazards (0.2, 0.5, 0.25), censored in bin 2 -> -log S_2 = -log(0.8 * 0.5 * 0.75)
    # Case C: hazards (0.1, 0.3, 0.6), event in bin 0     -> -[log S_{-1} + log h_0] = -[log 1 + log 0.1]
    hazards = [(0.5, 0.5, 0.5), (0.2, 0.5, 0.25), (0.1, 0.3, 0.6)]
    logits = torch.tensor([[logit(p) for p in row] for row in hazards], dtype=torch.float64)
    bins = torch.tensor([1, 2, 0])
    events = torch.tensor([1, 0, 1])
    uncensored_a = -(math.log(0.5) + math.log(0.5))
    censored_b = -math.log(0.8 * 0.5 * 0.75)
    uncensored_c = -(math.log(1.0) + math.log(0.1))
    # loss_i = (1 - alpha) * (censored_i + uncensored_i) + alpha * uncensored_i, then the mean.
    per_case = [uncensored_a, (1 - alpha) * censored_b, uncensored_c]
    expected = sum(per_case) / 3
    loss = DiscreteTimeSurvivalLoss(alpha=alpha)(logits, bins, events)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_discrete_time_nll_rejects_bins_outside_the_head() -> None:
    with pytest.raises(ValueError, match=r"time bins must lie in \[0, 4\)"):
        DiscreteTimeSurvivalLoss()(torch.zeros(2, 4), torch.tensor([0, 4]), torch.tensor([1, 1]))


def test_hazards_to_risk_value_and_ordering() -> None:
    # Hazard 0.5 in both bins: S = (0.5, 0.25), risk = -(0.5 + 0.25).
    assert hazards_to_risk(torch.zeros(1, 2)).item() == pytest.approx(-0.75)
    base = torch.randn(1, 4)
    logits = torch.cat([base - 2.0, base, base + 1.0, base + 3.0])  # increasing hazards in every bin
    risk = hazards_to_risk(logits)
    assert torch.all(risk[1:] > risk[:-1])


def test_cox_breslow_with_ties_by_hand() -> None:
    risk = torch.tensor([0.3, -0.2, 0.5, 1.0])
    times = torch.tensor([1.0, 2.0, 2.0, 3.0])
    events = torch.tensor([1, 1, 0, 1])
    r = risk.tolist()
    e = [math.exp(v) for v in r]
    # Breslow risk sets R(i) = {j : t_j >= t_i}; the tied case 2 (censored) stays in case 1's set.
    term0 = r[0] - math.log(e[0] + e[1] + e[2] + e[3])
    term1 = r[1] - math.log(e[1] + e[2] + e[3])
    term3 = r[3] - math.log(e[3])
    expected = -(term0 + term1 + term3) / 3
    assert CoxLoss()(risk, times, events).item() == pytest.approx(expected, rel=1e-6)
    assert CoxLoss()(risk.unsqueeze(1), times, torch.zeros(4)).item() == 0.0


def test_cox_matches_lifelines_partial_likelihood() -> None:
    lifelines = pytest.importorskip("lifelines")
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    times = rng.exponential(scale=np.exp(-0.8 * x)) + 1e-3  # continuous: no ties
    events = (rng.uniform(size=40) < 0.7).astype(int)
    frame = pd.DataFrame({"x": x, "time": times, "event": events})
    fitter = lifelines.CoxPHFitter(penalizer=0.0).fit(frame, duration_col="time", event_col="event")
    beta = torch.tensor(float(fitter.params_["x"]), dtype=torch.float64, requires_grad=True)
    loss = CoxLoss()(beta * torch.tensor(x), torch.tensor(times), torch.tensor(events))
    # lifelines' log_likelihood_ is the maximised partial log-likelihood (a sum over events).
    assert -loss.item() * events.sum() == pytest.approx(fitter.log_likelihood_, rel=1e-5)
    loss.backward()  # at lifelines' optimum the gradient in beta vanishes
    assert abs(beta.grad.item()) < 1e-4


def test_survival_bins_use_uncensored_quantiles() -> None:
    times = [1, 2, 3, 4, 5, 6, 7, 8, 100, 200]
    events = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # the censored long times must not move the edges
    edges = survival_bins(times, events, num_bins=4)
    # numpy's linear quantiles of 1..8 at q: 1 + q * 7 -> 2.75, 4.5, 6.25.
    assert edges.tolist() == [0.0, 2.75, 4.5, 6.25, math.inf]
    bins = time_to_bin(torch.tensor([0.0, 2.7, 2.75, 4.5, 6.0, 300.0]), edges)
    assert bins.dtype == torch.long
    assert bins.tolist() == [0, 0, 1, 2, 2, 3]


def test_survival_bins_errors() -> None:
    with pytest.raises(ValueError, match="no uncensored case"):
        survival_bins([1.0, 2.0], [0, 0], num_bins=2)
    with pytest.raises(ValueError, match="use fewer bins"):
        survival_bins([5.0, 5.0, 5.0, 1.0], [1, 1, 1, 0], num_bins=3)
    with pytest.raises(ValueError, match="non-negative"):
        survival_bins([-1.0, 2.0], [1, 1], num_bins=2)


def test_heads_are_bias_free_by_default_and_name_the_option_for_old_checkpoints() -> None:
    torch.manual_seed(0)
    head = ClassificationHead(in_dim=8, num_classes=3)
    assert head.fc.bias is None and set(head.state_dict()) == {"fc.weight"}
    x = torch.randn(4, 8)
    torch.testing.assert_close(head(x), x @ head.fc.weight.T)  # no offset: zero in, zero out
    assert (head(torch.zeros(2, 8)) == 0).all()
    old = ClassificationHead(in_dim=8, num_classes=3, bias=True)
    assert old.fc.bias is not None
    with pytest.raises(RuntimeError, match="head_bias: true"):
        head.load_state_dict(old.state_dict())
    surv = SurvivalHead(in_dim=8, num_bins=4)
    assert surv.fc.bias is None
    with pytest.raises(RuntimeError, match="head_bias: false"):
        SurvivalHead(in_dim=8, num_bins=4, bias=True).load_state_dict(surv.state_dict())
