"""Task heads on the slide feature from an aggregator.

Build them after the aggregator with ``in_dim=aggregator.out_dim``.

* Classification / subtyping / grading (K ordinal classes trained with cross-entropy):
  :class:`ClassificationHead` -> logits [B, K].
* Survival: :class:`SurvivalHead` -> hazard logits [B, K] over K discrete time bins (use with
  ``DiscreteTimeSurvivalLoss``); ``num_bins=1`` gives one log-risk score for ``CoxLoss``.
"""

from __future__ import annotations

import torch
from torch import nn


class _LinearHead(nn.Module):
    """Dropout -> Linear(in_dim, out_features)."""

    def __init__(self, in_dim: int, out_features: int, dropout: float, what: str) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"{type(self).__name__}: in_dim must be positive, got {in_dim}")
        if out_features <= 0:
            raise ValueError(f"{type(self).__name__}: {what} must be positive, got {out_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_features)
        nn.init.xavier_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, slide: torch.Tensor) -> torch.Tensor:
        """slide features [B, in_dim] -> [B, out_features]."""
        return self.fc(self.dropout(slide))


class ClassificationHead(_LinearHead):
    """Class logits for subtyping, diagnosis or grading.

    Args:
        in_dim: Slide feature width (the aggregator's ``out_dim``).
        num_classes: Number of classes K.
        dropout: Dropout before the linear layer.

    Shapes:
        forward(slide [B, in_dim]) -> logits [B, K].
    """

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(in_dim, num_classes, dropout, "num_classes")
        self.num_classes = num_classes


class SurvivalHead(_LinearHead):
    """Hazard logits over discrete time bins: hazard_k = sigmoid(logit_k).

    Args:
        in_dim: Slide feature width (the aggregator's ``out_dim``).
        num_bins: Number of time bins K (``num_bins=1``: a single log-risk for the Cox loss).
        dropout: Dropout before the linear layer.

    Shapes:
        forward(slide [B, in_dim]) -> hazard logits [B, K].
    """

    def __init__(self, in_dim: int, num_bins: int = 4, dropout: float = 0.0) -> None:
        super().__init__(in_dim, num_bins, dropout, "num_bins")
        self.num_bins = num_bins
