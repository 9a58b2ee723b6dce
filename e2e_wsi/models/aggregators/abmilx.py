"""ABMILX: multi-head local attention with the global attention-plus (A+) refinement.

Follows section 3.2 and appendix B.3 of the paper (Eq. 3 and 4):

1. LayerNorm (no bias) -> Linear D -> inner (no bias) -> GELU -> dropout.
2. The inner features are split into H contiguous heads of width hd = inner / H.
3. One MLP shared by all heads, Linear(hd, hd) -> GELU -> Linear(hd, 1), gives local logits A^j [N].
4. A+: LayerNorm(hd) on each head, one shared Linear(hd -> 2 hd) gives Q, K;
   U = softmax(Q K^T / sqrt(hd)) over instances and A^j <- A^j + alpha * U A^j, on the logits, before
   the instance softmax. alpha is a learnable scalar.
5. Masked softmax over instances per head, attention-weighted sum of each head's features, heads
   concatenated -> Linear(inner, inner) -> optional residual FFN -> LayerNorm (no bias).

U A is computed with ``scaled_dot_product_attention`` whose value is the logit column, so memory stays
O(N). On CPU a value of width 1 makes SDPA fall back to the math kernel, which materialises the N x N
matrix; zero-padding the value to the head width takes the fused kernel, and channel 0 of its output
is U A exactly (the padded channels are 0).
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
    make_activation,
    masked_fill_padding,
    masked_softmax,
    validate_bag,
)


class ABMILX(nn.Module):
    """The paper's aggregator (multi-head local attention + attention plus).

    Args:
        in_dim: Instance feature width D (256 after ResNet-18 ``layer3``, 1024 for ResNet-50).
        inner_dim: Width after the input projection, and the slide feature width (``out_dim``).
        heads: Number of heads H; ``inner_dim`` must be divisible by it. ``heads=1`` is the
            single-head ablation.
        dropout: Dropout after the input projection.
        attn_plus: Use the A+ refinement. False gives MHLA only (alpha = 0, no Q/K parameters).
        alpha_init: Initial value of the learnable scalar alpha.
        attn_bias: Bias in the attention MLP (off by default, as in the paper; a switch for survival).
        ffn: Add the residual FFN (LayerNorm -> Linear 4x -> GELU -> Linear) after the projection.
        act: Activation of the input stem (``gelu`` or ``relu``).

    Shapes:
        forward(x [B, N, in_dim], mask [B, N] bool | None) -> (slide [B, inner_dim], attention [B, H, N]).
        ``attention`` is the final per-head softmax (after A+); rows sum to 1 over valid instances.
    """

    def __init__(
        self,
        in_dim: int,
        inner_dim: int = 256,
        heads: int = 8,
        dropout: float = 0.25,
        attn_plus: bool = True,
        alpha_init: float = 1.0,
        attn_bias: bool = False,
        ffn: bool = False,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        check_positive("in_dim", in_dim, "ABMILX")
        check_positive("heads", heads, "ABMILX")
        check_dropout(dropout, "ABMILX")
        if inner_dim % heads != 0:
            raise ValueError(f"ABMILX: inner_dim={inner_dim} must be divisible by heads={heads}")
        self.in_dim = in_dim
        self.out_dim = inner_dim
        self.heads = heads
        self.head_dim = inner_dim // heads
        self.attn_plus = attn_plus
        hd = self.head_dim

        self.stem = InputStem(in_dim, inner_dim, dropout=dropout, act=act)
        self.attention = nn.Sequential(
            nn.Linear(hd, hd, bias=attn_bias), nn.GELU(), nn.Linear(hd, 1, bias=attn_bias)
        )
        if attn_plus:
            self.plus_norm = nn.LayerNorm(hd)
            self.qk = nn.Linear(hd, 2 * hd, bias=False)
        self.proj = nn.Linear(inner_dim, inner_dim, bias=False)
        self.ffn: nn.Module | None = None
        if ffn:
            self.ffn_norm = nn.LayerNorm(inner_dim)
            self.ffn = nn.Sequential(
                nn.Linear(inner_dim, 4 * inner_dim, bias=False),
                make_activation("gelu"),
                nn.Linear(4 * inner_dim, inner_dim, bias=False),
            )
        self.norm_out = nn.LayerNorm(inner_dim, bias=False)
        self.apply(init_weights)
        # Registered after init so the xavier pass cannot touch it.
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if attn_plus else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a bag with the memory-efficient SDPA path.

        Args:
            x: Instance features [B, N, in_dim].
            mask: [B, N] bool, True for real instances; None means all valid.

        Returns:
            slide [B, inner_dim] and attention [B, H, N].
        """
        return self._aggregate(x, mask, naive=False)

    def forward_naive(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference path that materialises U [B, H, N, N]; for tests only (O(N^2) memory)."""
        return self._aggregate(x, mask, naive=True)

    def local_logits(self, heads: torch.Tensor) -> torch.Tensor:
        """MHLA logits: the shared MLP applied to every head, [B, H, N, hd] -> [B, H, N]."""
        return self.attention(heads).squeeze(-1)

    def split_heads(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Input stem then head split: [B, N, in_dim] -> [B, H, N, hd] (padding zeroed)."""
        b, n, _ = x.shape
        h = masked_fill_padding(self.stem(x), mask)
        return h.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _aggregate(
        self, x: torch.Tensor, mask: torch.Tensor | None, naive: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = validate_bag(x, mask)
        b = x.shape[0]
        heads = self.split_heads(x, mask)
        logits = self.local_logits(heads)
        if self.attn_plus:
            propagated = (
                self._propagate_naive(heads, logits, mask) if naive else self._propagate(heads, logits, mask)
            )
            logits = logits + self.alpha * propagated
        attention = masked_softmax(logits, None if mask is None else mask[:, None, :])
        pooled = torch.einsum("bhn,bhnd->bhd", attention, heads).reshape(b, self.out_dim)
        slide = self.proj(pooled)
        if self.ffn is not None:
            slide = slide + self.ffn(self.ffn_norm(slide))
        return self.norm_out(slide), attention

    def _query_key(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.qk(self.plus_norm(heads)).chunk(2, dim=-1)
        return q, k

    def _propagate(
        self, heads: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """U A via fused SDPA: [B, H, N] logits -> [B, H, N], never forming U."""
        q, k = self._query_key(heads)
        # Zero-padding the value to the head width selects the fused (O(N) memory) CPU kernel.
        value = F.pad(logits.unsqueeze(-1), (0, self.head_dim - 1))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, value, attn_mask=attn_mask)
        return out[..., 0]

    def _propagate_naive(
        self, heads: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """U A with U materialised, the literal Eq. 4."""
        q, k = self._query_key(heads)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        u = masked_softmax(scores, None if mask is None else mask[:, None, None, :])
        return (u @ logits.unsqueeze(-1)).squeeze(-1)
