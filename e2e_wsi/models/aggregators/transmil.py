"""TransMIL (Shao et al., 2021): CLS token, two self-attention layers and a PPEG between them.

Deviation from the original: the self-attention is standard multi-head attention computed with
``scaled_dot_product_attention`` (fused, O(L) memory on CPU and GPU) instead of Nystrom attention;
it is exact rather than a landmark approximation, and needs no extra dependency.

PPEG reshapes the tokens into a square grid, so each bag's valid instances (padding removed, order
kept) are repeated cyclically up to side^2 tokens, side = ceil(sqrt(n_max)) with n_max the largest
number of valid instances in the batch; the original TransMIL pads the same way (it appends the first
instances again). Because of the positional convolution the output is NOT invariant to instance
order, and in a batch of bags of different sizes a bag's grid depends on n_max.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from e2e_wsi.models.aggregators._common import (
    InputStem,
    check_dropout,
    check_positive,
    init_weights,
    validate_bag,
)
from e2e_wsi.models.registry import register_aggregator


class _AttentionLayer(nn.Module):
    """Pre-norm residual multi-head self-attention: x + W_o MHSA(LN(x))."""

    def __init__(self, dim: int, heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_dropout = attn_dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cls_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, L, dim] -> ([B, L, dim], CLS-row attention averaged over heads [B, L] or None)."""
        b, length, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, L, hd]
        drop = self.attn_dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = x + self.out(mixed.transpose(1, 2).reshape(b, length, dim))
        weights = None
        if cls_weights:
            # Only the CLS row is formed, so reporting attention stays O(L).
            row = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(self.head_dim)
            weights = torch.softmax(row, dim=-1).mean(dim=1)
        return out, weights


class _PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7x7 + 5x5 + 3x3 convolutions on the token grid, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """[B, 1 + side^2, dim] -> same shape; the CLS token passes through."""
        b, _, dim = tokens.shape
        cls, feat = tokens[:, :1], tokens[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + self.conv7(grid) + self.conv5(grid) + self.conv3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@register_aggregator("transmil")
class TransMIL(nn.Module):
    """Transformer MIL with a CLS token and PPEG.

    Args:
        in_dim: Instance feature width D.
        dim: Token width (``out_dim``); divisible by ``heads``.
        heads: Attention heads.
        dropout: Dropout after the input stem.
        attn_dropout: Dropout on the attention weights during training.

    Shapes:
        forward(x [B, N, in_dim], mask [B, N] | None) -> (slide [B, dim], attention [B, 1, N]).
        ``attention`` is the CLS token's attention in the last layer, averaged over heads, with the
        CLS self-weight dropped, the weights of repeated copies summed back onto their instance, and
        renormalised to sum to 1 over the valid instances.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 512,
        heads: int = 8,
        dropout: float = 0.25,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("in_dim", in_dim, "TransMIL")
        check_dropout(dropout, "TransMIL")
        check_dropout(attn_dropout, "TransMIL")
        if dim % heads != 0:
            raise ValueError(f"TransMIL: dim={dim} must be divisible by heads={heads}")
        self.in_dim = in_dim
        self.out_dim = dim
        self.stem = InputStem(in_dim, dim, dropout=dropout, act="relu")
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.layer1 = _AttentionLayer(dim, heads, attn_dropout)
        self.ppeg = _PPEG(dim)
        self.layer2 = _AttentionLayer(dim, heads, attn_dropout)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    @staticmethod
    def grid_sources(
        mask: torch.Tensor | None, batch: int, n: int, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """Index of the instance behind each grid token.

        Args:
            mask: [B, N] bool or None.
            batch: B.
            n: N.
            device: Device of the index tensor.

        Returns:
            (sources [B, side^2] long, side): valid instances in order, repeated cyclically.
        """
        if mask is None:
            order = torch.arange(n, device=device).expand(batch, n)
            counts = torch.full((batch,), n, device=device)
        else:
            # Stable sort of "is padding" moves valid instances to the front, order kept.
            order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
            counts = mask.sum(dim=1)
        side = math.ceil(math.sqrt(int(counts.max())))
        positions = torch.arange(side * side, device=device).unsqueeze(0) % counts.unsqueeze(1)
        return torch.gather(order, 1, positions), side

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a bag; see the class docstring for shapes."""
        mask = validate_bag(x, mask)
        b, n, _ = x.shape
        h = self.stem(x)
        sources, side = self.grid_sources(mask, b, n, x.device)
        seq = torch.gather(h, 1, sources.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), seq], dim=1)
        tokens, _ = self.layer1(tokens)
        tokens = self.ppeg(tokens, side)
        tokens, cls_weights = self.layer2(tokens, cls_weights=True)
        slide = self.norm(tokens[:, 0])
        attention = torch.zeros(b, n, dtype=cls_weights.dtype, device=x.device)
        attention.scatter_add_(1, sources, cls_weights[:, 1:])
        attention = attention / attention.sum(dim=1, keepdim=True)
        return slide, attention.unsqueeze(1)
