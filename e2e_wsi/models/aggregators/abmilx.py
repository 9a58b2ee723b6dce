"""ABMILX: multi-head local attention with the global attention-plus (A+) refinement.

Follows section 3.2 and appendix B.3 of the paper (Eq. 3 and 4) and, where the paper is silent, the
authors' code (``modules/abmilx.py`` of DearCaat/E2E-WSI-ABMILX, class ``DAttentionX``):

1. LayerNorm -> Linear D -> inner -> GELU -> dropout (no biases: appendix B.3, ``mil_bias=False``).
2. The inner features are split into H contiguous heads of width hd = inner / H.
3. One MLP shared by all heads, Linear(hd, hd) -> GELU -> Linear(hd, 1), gives local logits A^j [N].
4. A+: LayerNorm(hd) on each head, one shared Linear(hd -> 2 hd) gives Q, K;
   U = softmax(Q K^T / sqrt(hd)) over instances and A^j <- A^j + alpha * U A^j, on the logits, before
   the instance softmax. alpha is a learnable scalar (the official code holds it as the weight of a
   1x1 bias-free Linear applied to A, initialised like every MIL Linear: Xavier-normal, i.e. N(0, 1)).
5. Masked softmax over instances per head, attention-weighted sum of each head's features, heads
   concatenated -> Linear(inner, inner) -> optional residual FFN -> LayerNorm.

The FFN follows the official code by default: ``x + fc2(GELU(fc1(x)))`` with biases and no pre-norm
(the official pre-norm is replaced by an identity whenever the MIL input LayerNorm is on).

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
from e2e_wsi.models.registry import register_aggregator

FFN_VARIANTS = ("official", "prenorm")
WEIGHT_INITS = ("xavier", "torch")


@register_aggregator("abmilx")
class ABMILX(nn.Module):
    """The paper's aggregator (multi-head local attention + attention plus).

    Args:
        in_dim: Instance feature width D (256 after ResNet-18 ``layer3``, 1024 for ResNet-50).
        inner_dim: Width after the input projection, and the slide feature width (``out_dim``).
        heads: Number of heads H; ``inner_dim`` must be divisible by it. ``heads=1`` is the
            single-head ablation.
        dropout: Dropout after the input projection.
        attn_plus: Use the A+ refinement. False gives MHLA only (no alpha, no Q/K parameters).
        alpha_init: Initial alpha: a number, or ``"official"`` (the official scheme: the Xavier-normal
            draw of a 1x1 weight, i.e. N(0, 1), so alpha can start negative or near 0).
        learn_alpha: Learn alpha (default). False keeps it fixed at ``alpha_init`` (a buffer under the
            same state-dict key): ``alpha_init=0.0, learn_alpha=False`` is the "alpha = 0" ablation
            with exactly the same parameters as the full model.
        attn_bias: Bias in the attention MLP (off by default; the official survival config turns it on).
        ffn: Add the residual FFN (Linear 4x -> GELU -> Linear) after the projection.
        ffn_variant: ``"official"`` (biases, no pre-norm: the official code with the MIL LayerNorm on)
            or ``"prenorm"`` (LayerNorm -> bias-free Linears; this package's FFN before the official
            one was matched, kept to load old checkpoints).
        act: Activation of the input stem (``gelu`` or ``relu``).
        mil_bias: Biases of the input stem (LayerNorm and Linear), the projection and the output
            LayerNorm. Off, as in appendix B.3 ("disabled the bias of all fully connected layers").
        input_norm: LayerNorm at the MIL input. On for E2E training (appendix B.3: "added a LayerNorm
            layer at its input to better optimize the Encoder"); the official two-stage runs have none
            (``mil_norm`` unset in ``config/feat/*.yaml``, ``options.py:103`` default None).
        output_norm: LayerNorm on the slide vector (the official ``norm1``, present only with
            ``mil_norm: ln``). Off in the two-stage recipe, like ``input_norm``.
        weight_init: ``"xavier"`` re-draws every Linear weight Xavier-normal with zero biases, the
            CLAM convention the official module applies (``modules/abmilx.py:7-21``); ``"torch"`` keeps
            PyTorch's default Linear initialisation (uniform, bound 1/sqrt(fan_in), about half the
            Xavier scale here). On frozen features a sparse instance signal is learned from ``"torch"``
            but memorised away from ``"xavier"`` (docs/results.md, "Two-stage recipe").

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
        alpha_init: float | str = "official",
        learn_alpha: bool = True,
        attn_bias: bool = False,
        ffn: bool = False,
        ffn_variant: str = "official",
        act: str = "gelu",
        mil_bias: bool = False,
        input_norm: bool = True,
        output_norm: bool = True,
        weight_init: str = "xavier",
    ) -> None:
        super().__init__()
        check_positive("in_dim", in_dim, "ABMILX")
        check_positive("heads", heads, "ABMILX")
        check_dropout(dropout, "ABMILX")
        if inner_dim % heads != 0:
            raise ValueError(f"ABMILX: inner_dim={inner_dim} must be divisible by heads={heads}")
        if ffn_variant not in FFN_VARIANTS:
            raise ValueError(f"ABMILX: ffn_variant must be one of {FFN_VARIANTS}, got {ffn_variant!r}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"ABMILX: weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        if isinstance(alpha_init, str) and alpha_init != "official":
            raise ValueError(f"ABMILX: alpha_init must be a number or 'official', got {alpha_init!r}")
        self.in_dim = in_dim
        self.out_dim = inner_dim
        self.heads = heads
        self.head_dim = inner_dim // heads
        self.attn_plus = attn_plus
        self.ffn_variant = ffn_variant
        hd = self.head_dim

        self.stem = InputStem(
            in_dim, inner_dim, dropout=dropout, act=act, input_norm=input_norm, bias=mil_bias
        )
        self.attention = nn.Sequential(
            nn.Linear(hd, hd, bias=attn_bias), nn.GELU(), nn.Linear(hd, 1, bias=attn_bias)
        )
        if attn_plus:
            self.plus_norm = nn.LayerNorm(hd)
            self.qk = nn.Linear(hd, 2 * hd, bias=False)
        self.proj = nn.Linear(inner_dim, inner_dim, bias=mil_bias)
        self.ffn_norm: nn.Module | None = None
        self.ffn: nn.Module | None = None
        if ffn:
            official = ffn_variant == "official"
            if not official:
                self.ffn_norm = nn.LayerNorm(inner_dim)
            self.ffn = nn.Sequential(
                nn.Linear(inner_dim, 4 * inner_dim, bias=official),
                make_activation("gelu"),
                nn.Linear(4 * inner_dim, inner_dim, bias=official),
            )
        self.norm_out = nn.LayerNorm(inner_dim, bias=mil_bias) if output_norm else nn.Identity()
        if weight_init == "xavier":
            self.apply(init_weights)
        # Created after the Xavier pass, in the same order as the official module's weight draws end.
        if not attn_plus:
            self.alpha = None
        elif learn_alpha:
            self.alpha = nn.Parameter(initial_alpha(alpha_init))
        else:
            self.register_buffer("alpha", initial_alpha(alpha_init))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Explain checkpoints whose FFN variant differs from this module's, instead of a bare key list."""
        has_norm = f"{prefix}ffn_norm.weight" in state_dict
        has_bias = f"{prefix}ffn.0.bias" in state_dict
        if not strict or self.ffn is None:
            pass
        elif (has_norm or not has_bias) and self.ffn_variant == "official":
            errors.append(
                "ABMILX: this checkpoint's FFN is the pre-norm, bias-free variant (saved before the FFN was "
                "matched to the official code); load it with `ffn_variant: prenorm` in the aggregator's init_args"
            )
        elif has_bias and self.ffn_variant == "prenorm":
            errors.append(
                "ABMILX: this checkpoint's FFN is the official variant; use `ffn_variant: official`"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

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
            slide = slide + self.ffn(slide if self.ffn_norm is None else self.ffn_norm(slide))
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


def initial_alpha(alpha_init: float | str) -> torch.Tensor:
    """Initial value of alpha as a 0-d float tensor.

    ``"official"`` reproduces the official scheme: alpha is the weight of a 1x1 bias-free Linear that
    the official ``initialize_weights`` re-draws with Xavier-normal, whose std for fan-in = fan-out = 1
    is 1 (so a draw from N(0, 1) using torch's global generator).
    """
    if alpha_init == "official":
        weight = torch.empty(1, 1)
        nn.init.xavier_normal_(weight)
        return weight.reshape(())
    return torch.tensor(float(alpha_init))
