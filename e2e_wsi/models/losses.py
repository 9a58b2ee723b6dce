"""Losses and survival helpers.

Sign conventions (used everywhere in this package):

* ``events``: 1 (or True) when the event (death/progression) was observed, 0 when the case is
  censored. This is the manifest's ``event`` column; note that CLAM/MCAT code passes the opposite,
  a censorship flag c = 1 - event.
* ``bins``: discrete time bin k of a case, from :func:`time_to_bin`; bin k covers
  [edges[k], edges[k + 1]). A censored case in bin k is known to survive through bin k.
* Hazard logits [B, K]: hazard h_k = sigmoid(logit_k) = P(event in bin k | alive at its start);
  survival S_k = prod_{j<=k} (1 - h_j).
* ``risk``: higher means shorter expected survival. :func:`hazards_to_risk` gives -sum_k S_k and the
  Cox model's log-risk has the same direction. For a concordance index that expects predicted
  survival times (lifelines ``concordance_index``), pass ``-risk``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


class ClassificationLoss(nn.Module):
    """Cross-entropy on class logits, with optional class weights and label smoothing.

    Args:
        class_weights: One weight per class (length K), e.g. inverse class frequency; None = equal.
        label_smoothing: Label smoothing in [0, 1).

    Shapes:
        forward(logits [B, K], target [B] long) -> scalar.
    """

    def __init__(self, class_weights: list[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if weights.dim() != 1 or weights.numel() == 0 or bool((weights < 0).any()):
                raise ValueError(
                    f"class_weights must be a non-empty list of non-negative floats, got {class_weights}"
                )
        self.register_buffer("class_weights", weights)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch."""
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[-1]:
            raise ValueError(
                f"class_weights has {self.class_weights.numel()} entries but the head gives {logits.shape[-1]} classes"
            )
        return F.cross_entropy(
            logits.float(), target.long(), weight=self.class_weights, label_smoothing=self.label_smoothing
        )


class RegressionLoss(nn.Module):
    """Mean squared error, or the Huber loss (quadratic within ``delta``, linear beyond: robust to outliers).

    Args:
        kind: ``mse`` or ``huber``.
        delta: Huber threshold, in the units of the values compared (> 0).

    Shapes:
        forward(pred [B], target [B]) -> scalar.
    """

    def __init__(self, kind: str = "mse", delta: float = 1.0) -> None:
        super().__init__()
        if kind not in ("mse", "huber"):
            raise ValueError(f"regression loss must be 'mse' or 'huber', got {kind!r}")
        if not delta > 0:
            raise ValueError(f"huber delta must be > 0, got {delta}")
        self.kind = kind
        self.delta = delta

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch."""
        pred, target = pred.float().view(-1), target.float().view(-1)
        if self.kind == "huber":
            return F.huber_loss(pred, target, delta=self.delta)
        return F.mse_loss(pred, target)


class DiscreteTimeSurvivalLoss(nn.Module):
    """Negative log-likelihood of a discrete-time hazard model (Zadeh & Schmid 2020; CLAM/MCAT style).

    With the survival S_{-1} = 1 and bin k of the case::

        uncensored = -event * (log S_{k-1} + log h_k)        # event in bin k
        censored   = -(1 - event) * log S_k                  # alive at the end of bin k
        loss       = mean((1 - alpha) * (censored + uncensored) + alpha * uncensored)

    Probabilities are clamped to ``eps`` before the log, as in the reference code.

    Args:
        alpha: Extra weight on the uncensored term (0 = plain NLL).
        eps: Lower clamp for probabilities inside the logs.

    Shapes:
        forward(logits [B, K], bins [B] long, events [B] bool/float) -> scalar.
    """

    def __init__(self, alpha: float = 0.0, eps: float = 1e-7) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.eps = eps

    def forward(self, logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        """Mean NLL over the batch; see the class docstring."""
        if logits.dim() != 2:
            raise ValueError(f"hazard logits must be [B, K], got shape {tuple(logits.shape)}")
        num_bins = logits.shape[1]
        bins = bins.long().view(-1, 1)
        if bool(((bins < 0) | (bins >= num_bins)).any()):
            raise ValueError(f"time bins must lie in [0, {num_bins}), got {bins.flatten().tolist()}")
        event = events.float().view(-1, 1)
        hazards = torch.sigmoid(logits.float())
        survival = torch.cumprod(1.0 - hazards, dim=1)
        survival_padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)  # S_{-1} = 1
        s_before = survival_padded.gather(1, bins).clamp_min(self.eps)
        s_at = survival_padded.gather(1, bins + 1).clamp_min(self.eps)
        h_at = hazards.gather(1, bins).clamp_min(self.eps)
        uncensored = -event * (torch.log(s_before) + torch.log(h_at))
        censored = -(1.0 - event) * torch.log(s_at)
        loss = (1.0 - self.alpha) * (censored + uncensored) + self.alpha * uncensored
        return loss.mean()


class CoxLoss(nn.Module):
    """Negative Cox partial log-likelihood over the batch, Breslow's handling of ties.

    For each case i with an observed event, with the risk set R(i) = {j : t_j >= t_i}::

        loss = -1 / n_events * sum_{i: event_i} (r_i - log sum_{j in R(i)} exp(r_j))

    A batch without events gives 0 (still attached to the graph).

    Shapes:
        forward(risk [B] or [B, 1] log-risk (higher = shorter survival), times [B], events [B]) -> scalar.
    """

    def forward(self, risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        """Mean negative partial log-likelihood per event; see the class docstring."""
        if risk.dim() == 2 and risk.shape[1] == 1:
            risk = risk[:, 0]
        if risk.dim() != 1:
            raise ValueError(f"Cox risk must be [B] or [B, 1], got shape {tuple(risk.shape)}")
        risk = risk.float()
        event = events.float().view(-1)
        times = times.to(risk.device).view(-1)
        at_risk = times.unsqueeze(0) >= times.unsqueeze(1)  # [i, j]: j is in the risk set of i
        scores = risk.unsqueeze(0).expand_as(at_risk).masked_fill(~at_risk, torch.finfo(risk.dtype).min)
        log_denominator = torch.logsumexp(scores, dim=1)
        num_events = event.sum()
        if float(num_events) == 0.0:
            return risk.sum() * 0.0
        return -((risk - log_denominator) * event).sum() / num_events


def hazards_to_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk score from hazard logits: -sum_k S_k (higher = shorter survival).

    Args:
        logits: Hazard logits [B, K].

    Returns:
        risk [B].
    """
    survival = torch.cumprod(1.0 - torch.sigmoid(logits.float()), dim=1)
    return -survival.sum(dim=1)


def _as_numpy(values: ArrayLike, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array.astype(np.float64).reshape(-1)


def survival_bins(times: ArrayLike, events: ArrayLike, num_bins: int) -> torch.Tensor:
    """Bin edges from the quantiles of the uncensored training times.

    Args:
        times: Follow-up times [n] (non-negative).
        events: Event indicators [n] (1 = observed, 0 = censored).
        num_bins: Number of bins K.

    Returns:
        edges [K + 1] float64: 0, the K-1 interior quantiles (k / K, linear interpolation), inf.

    Raises:
        ValueError: Negative or non-finite times, length mismatch, no uncensored case, or tied
            quantiles (too few distinct event times for ``num_bins``).
    """
    t = _as_numpy(times, "times")
    e = _as_numpy(events, "events")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if t.shape != e.shape:
        raise ValueError(f"times ({t.size}) and events ({e.size}) differ in length")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError("survival times must be finite and non-negative")
    observed = t[e > 0]
    if observed.size == 0:
        raise ValueError("no uncensored case (event = 1) to place the time bins; check the event column")
    interior = np.quantile(observed, np.arange(1, num_bins) / num_bins)
    edges = np.concatenate([[0.0], interior, [np.inf]])
    if (np.diff(edges) <= 0).any():
        raise ValueError(
            f"time-bin edges {edges.tolist()} are not strictly increasing: too few distinct event times "
            f"for num_bins={num_bins}; use fewer bins"
        )
    return torch.from_numpy(edges)


def time_to_bin(times: ArrayLike, edges: torch.Tensor) -> torch.Tensor:
    """Bin index of each time: k such that edges[k] <= t < edges[k + 1].

    Args:
        times: Times [n] (non-negative).
        edges: Edges [K + 1] from :func:`survival_bins`.

    Returns:
        LongTensor [n] with values in [0, K).
    """
    t = torch.from_numpy(_as_numpy(times, "times"))
    if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError("survival times must be finite and non-negative")
    return torch.bucketize(t, edges.to(torch.float64)[1:-1], right=True)
