"""Task heads on the slide feature from an aggregator.

Build them after the aggregator with ``in_dim=aggregator.out_dim``.

* Classification / subtyping / grading (K ordinal classes trained with cross-entropy):
  :class:`ClassificationHead` -> logits [B, K].
* Survival: :class:`SurvivalHead` -> hazard logits [B, K] over K discrete time bins (use with
  ``DiscreteTimeSurvivalLoss``); ``num_bins=1`` gives one log-risk score for ``CoxLoss``.
* Regression: :class:`RegressionHead` -> one value [B, 1] (use with ``RegressionLoss``).

The linear layer has no bias by default: appendix B.3 of the paper disables "the bias of all fully
connected layers in MIL", and the official classifier is ``nn.Linear(inner_dim, n_classes, bias=mil_bias)``
with ``mil_bias`` off (``modules/abmilx.py`` of DearCaat/E2E-WSI-ABMILX).
"""

from __future__ import annotations

import torch
from torch import nn


class _LinearHead(nn.Module):
    """Dropout -> Linear(in_dim, out_features), bias optional."""

    def __init__(self, in_dim: int, out_features: int, dropout: float, what: str, bias: bool = False) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"{type(self).__name__}: in_dim must be positive, got {in_dim}")
        if out_features <= 0:
            raise ValueError(f"{type(self).__name__}: {what} must be positive, got {out_features}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_features, bias=bias)
        nn.init.xavier_normal_(self.fc.weight)
        if self.fc.bias is not None:
            nn.init.zeros_(self.fc.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Name the option to flip when a checkpoint and this head disagree on the bias."""
        in_ckpt = f"{prefix}fc.bias" in state_dict
        if strict and in_ckpt != (self.fc.bias is not None):
            want = "true" if in_ckpt else "false"
            errors.append(
                f"{type(self).__name__}: the checkpoint's head {'has' if in_ckpt else 'has no'} bias (heads "
                f"became bias-free by default, as in the paper); load it with `head_bias: {want}` in the "
                "task's init_args"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, slide: torch.Tensor) -> torch.Tensor:
        """slide features [B, in_dim] -> [B, out_features]."""
        return self.fc(self.dropout(slide))


class ClassificationHead(_LinearHead):
    """Class logits for subtyping, diagnosis or grading.

    Args:
        in_dim: Slide feature width (the aggregator's ``out_dim``).
        num_classes: Number of classes K.
        dropout: Dropout before the linear layer.
        bias: Bias of the linear layer (off, as in the paper).

    Shapes:
        forward(slide [B, in_dim]) -> logits [B, K].
    """

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(in_dim, num_classes, dropout, "num_classes", bias)
        self.num_classes = num_classes


class SurvivalHead(_LinearHead):
    """Hazard logits over discrete time bins: hazard_k = sigmoid(logit_k).

    Args:
        in_dim: Slide feature width (the aggregator's ``out_dim``).
        num_bins: Number of time bins K (``num_bins=1``: a single log-risk for the Cox loss).
        dropout: Dropout before the linear layer.
        bias: Bias of the linear layer (off, as in the paper).

    Shapes:
        forward(slide [B, in_dim]) -> hazard logits [B, K].
    """

    def __init__(self, in_dim: int, num_bins: int = 4, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(in_dim, num_bins, dropout, "num_bins", bias)
        self.num_bins = num_bins


class RegressionHead(_LinearHead):
    """One continuous value per slide (in the task's standardised units).

    Args:
        in_dim: Slide feature width (the aggregator's ``out_dim``).
        dropout: Dropout before the linear layer.
        bias: Bias of the linear layer (the intercept; :class:`~e2e_wsi.models.tasks.RegressionTask`
            turns it on by default).

    Shapes:
        forward(slide [B, in_dim]) -> value [B, 1].
    """

    def __init__(self, in_dim: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(in_dim, 1, dropout, "outputs", bias)
