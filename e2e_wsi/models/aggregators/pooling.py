"""Mean and max pooling baselines (optionally after the shared input stem)."""

from __future__ import annotations

import torch
from torch import nn

from e2e_wsi.models.aggregators._common import InputStem, check_dropout, init_weights, validate_bag
from e2e_wsi.models.registry import register_aggregator


class _Pool(nn.Module):
    """Common constructor: an optional stem (LayerNorm -> Linear -> GELU -> dropout) before pooling.

    Args:
        in_dim: Instance feature width D.
        proj_dim: Width of the optional stem; None pools the raw features (``out_dim = in_dim``, no
            parameters).
        dropout: Dropout of the stem.
    """

    def __init__(self, in_dim: int, proj_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"{type(self).__name__}: in_dim must be positive, got {in_dim}")
        check_dropout(dropout, type(self).__name__)
        self.in_dim = in_dim
        self.stem: nn.Module = nn.Identity() if proj_dim is None else InputStem(in_dim, proj_dim, dropout)
        self.out_dim = in_dim if proj_dim is None else proj_dim
        self.apply(init_weights)


@register_aggregator("meanpool")
class MeanPool(_Pool):
    """Average of the valid instances.

    Shapes:
        forward(x [B, N, in_dim], mask [B, N] | None) -> (slide [B, out_dim], attention [B, 1, N]).
        ``attention`` is uniform, 1 / n_valid, over the valid instances (0 on padding): the weights
        the mean actually uses.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pool a bag; see the class docstring for shapes."""
        mask = validate_bag(x, mask)
        b, n, _ = x.shape
        if mask is None:
            weights = x.new_full((b, n), 1.0 / n)
        else:
            valid = mask.to(x.dtype)
            weights = valid / valid.sum(dim=1, keepdim=True)
        h = self.stem(x)
        # A weighted sum (not h.mean) so padded rows contribute exactly 0 whatever their values.
        slide = torch.bmm(weights.unsqueeze(1), h).squeeze(1)
        return slide, weights.unsqueeze(1)


@register_aggregator("maxpool")
class MaxPool(_Pool):
    """Channel-wise maximum over the valid instances.

    Shapes:
        forward(x [B, N, in_dim], mask [B, N] | None) -> (slide [B, out_dim], attention [B, 1, N]).
        ``attention[b, 0, i]`` is the share of channels whose maximum comes from instance i (the
        argmax share); it sums to 1 and is 0 on padding.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Max-pool a bag; see the class docstring for shapes."""
        mask = validate_bag(x, mask)
        h = self.stem(x)
        if mask is not None:
            h = h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min)
        slide, winners = h.max(dim=1)  # [B, C], [B, C]
        counts = torch.zeros(h.shape[0], h.shape[1], dtype=h.dtype, device=h.device)
        counts.scatter_add_(1, winners, torch.ones_like(slide))
        return slide, (counts / h.shape[2]).unsqueeze(1)
