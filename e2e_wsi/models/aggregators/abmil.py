"""ABMIL (Ilse et al., 2018): attention-based deep MIL pooling, with the gated variant.

The defaults follow the authors' ABMIL baseline (``modules/abmil.py``, class ``DAttention``, of
DearCaat/E2E-WSI-ABMILX) as run with ``mil_norm: ln`` and ``no_mil_bias``: LayerNorm -> Linear -> GELU ->
dropout, a tanh attention network of width 128 without biases, and a LayerNorm (no bias) on the pooled
vector before the task head.
"""

from __future__ import annotations

import torch
from torch import nn

from e2e_wsi.models.aggregators._common import (
    InputStem,
    check_dropout,
    check_positive,
    init_weights,
    masked_fill_padding,
    masked_softmax,
    validate_bag,
)
from e2e_wsi.models.registry import register_aggregator


@register_aggregator("abmil")
class ABMIL(nn.Module):
    """Single-head attention pooling: a_i = softmax_i(w^T tanh(V h_i) [* sigmoid(U h_i)]).

    Uses the same input stem as ABMILX (LayerNorm, bias-free Linear, GELU, dropout) so the baselines
    differ only in how they pool.

    Args:
        in_dim: Instance feature width D.
        inner_dim: Width after the input stem and of the slide feature (``out_dim``).
        attn_dim: Hidden width of the attention network.
        gated: Use the gated attention of Ilse et al. (tanh branch times sigmoid branch).
        dropout: Dropout after the input stem.
        attn_bias: Bias in the attention network layers.
        output_norm: LayerNorm (no bias) on the pooled vector, as the official baseline does. False gives
            the raw attention-weighted mean (this package's ABMIL before it was matched; old checkpoints
            without ``norm_out`` need it).

    Shapes:
        forward(x [B, N, in_dim], mask [B, N] | None) -> (slide [B, inner_dim], attention [B, 1, N]).
    """

    def __init__(
        self,
        in_dim: int,
        inner_dim: int = 256,
        attn_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.25,
        attn_bias: bool = False,
        output_norm: bool = True,
    ) -> None:
        super().__init__()
        check_positive("in_dim", in_dim, "ABMIL")
        check_positive("attn_dim", attn_dim, "ABMIL")
        check_dropout(dropout, "ABMIL")
        self.in_dim = in_dim
        self.out_dim = inner_dim
        self.gated = gated
        self.stem = InputStem(in_dim, inner_dim, dropout=dropout)
        self.attn_v = nn.Sequential(nn.Linear(inner_dim, attn_dim, bias=attn_bias), nn.Tanh())
        self.attn_u = (
            nn.Sequential(nn.Linear(inner_dim, attn_dim, bias=attn_bias), nn.Sigmoid()) if gated else None
        )
        self.attn_w = nn.Linear(attn_dim, 1, bias=attn_bias)
        self.norm_out: nn.Module | None = nn.LayerNorm(inner_dim, bias=False) if output_norm else None
        self.apply(init_weights)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Name the option to flip when a checkpoint and this module disagree on the output LayerNorm."""
        in_ckpt = f"{prefix}norm_out.weight" in state_dict
        if not strict:
            pass
        elif self.norm_out is not None and not in_ckpt:
            errors.append(
                "ABMIL: this checkpoint has no output LayerNorm (saved before ABMIL was matched to the "
                "official baseline); load it with `output_norm: false` in the aggregator's init_args"
            )
        elif self.norm_out is None and in_ckpt:
            errors.append("ABMIL: this checkpoint has an output LayerNorm; load it with `output_norm: true`")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool a bag.

        Args:
            x: Instance features [B, N, in_dim].
            mask: [B, N] bool, True for real instances; None means all valid.

        Returns:
            slide [B, inner_dim] and attention [B, 1, N].
        """
        mask = validate_bag(x, mask)
        h = masked_fill_padding(self.stem(x), mask)
        gate = self.attn_v(h)
        if self.attn_u is not None:
            gate = gate * self.attn_u(h)
        logits = self.attn_w(gate).squeeze(-1)  # [B, N]
        attention = masked_softmax(logits, mask).unsqueeze(1)  # [B, 1, N]
        slide = torch.bmm(attention, h).squeeze(1)
        if self.norm_out is not None:
            slide = self.norm_out(slide)
        return slide, attention
