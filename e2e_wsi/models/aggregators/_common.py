"""Pieces shared by every aggregator: mask validation, masked softmax, input stem, weight init.

Every aggregator follows one contract::

    forward(x: [B, N, D], mask: [B, N] bool | None) -> (slide: [B, out_dim], attention: [B, H, N])

``mask[b, i]`` is True for a real instance and False for padding. Padding gets exactly zero attention
and does not change the slide output.
"""

from __future__ import annotations

import torch
from torch import nn


def validate_bag(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Check a bag and its mask; return the mask, or None when every instance is valid.

    Returning None for an all-True mask lets callers take the faster unmasked kernels.

    Args:
        x: Instance features [B, N, D].
        mask: [B, N] bool (True = real instance) or None.

    Returns:
        The mask, or None if it is absent or all True.

    Raises:
        ValueError: If ``x`` is not 3-D, the mask is not bool or has the wrong shape, or a bag has no
            valid instance (its attention would be undefined).
    """
    if x.dim() != 3:
        raise ValueError(f"aggregator input must be [B, N, D], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("aggregator input has N = 0 instances; every bag needs at least one")
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = real instance), got dtype {mask.dtype}")
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the bag's [B, N] = {tuple(x.shape[:2])}"
        )
    valid_per_bag = mask.any(dim=1)
    if not bool(valid_per_bag.all()):
        empty = torch.nonzero(~valid_per_bag).flatten().tolist()
        raise ValueError(f"bags {empty} have no valid instance (mask all False); drop them from the batch")
    if bool(mask.all()):
        return None
    return mask


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over instances that gives exactly zero weight to padded positions.

    The most negative finite value (not -inf) is used so that a fully masked row cannot produce NaN
    and so that the result is exact zeros after exp underflow.

    Args:
        logits: [..., N] (or N at ``dim``) attention logits.
        mask: Bool tensor broadcastable to ``logits`` (True = keep), or None.
        dim: Dimension to normalise over.

    Returns:
        Tensor like ``logits`` whose entries along ``dim`` sum to 1 over the kept positions.
    """
    if mask is None:
        return torch.softmax(logits, dim=dim)
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=dim).masked_fill(~mask, 0.0)


def masked_fill_padding(x: torch.Tensor, mask: torch.Tensor | None, value: float = 0.0) -> torch.Tensor:
    """Replace padded instances of ``x`` [B, N, ...] by ``value`` so junk cannot leak (e.g. as NaN*0)."""
    if mask is None:
        return x
    shape = mask.shape + (1,) * (x.dim() - mask.dim())
    return x.masked_fill(~mask.view(shape), value)


class InputStem(nn.Sequential):
    """LayerNorm -> Linear -> activation -> dropout, applied per instance (no biases by default).

    The paper (appendix B.3) adds a LayerNorm at the MIL input to help optimise the encoder and drops
    the bias of every fully connected MIL layer; all aggregators here share this stem.

    Args:
        in_dim: Input feature width D.
        out_dim: Output width.
        dropout: Dropout probability after the activation.
        act: ``"gelu"`` or ``"relu"``.
        input_norm: Whether to start with the LayerNorm.
        bias: Biases of the LayerNorm and the Linear layer (the official ``mil_bias``; off by default).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dropout: float = 0.25,
        act: str = "gelu",
        input_norm: bool = True,
        bias: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        if input_norm:
            layers.append(nn.LayerNorm(in_dim, bias=bias))
        layers += [nn.Linear(in_dim, out_dim, bias=bias), make_activation(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


def make_activation(name: str) -> nn.Module:
    """Build an activation module from its name (``gelu``, ``relu``, ``tanh``)."""
    table = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


def init_weights(module: nn.Module) -> None:
    """Xavier-normal Linear/Conv weights, zero biases, unit LayerNorm (the CLAM/ABMILX convention).

    Apply with ``model.apply(init_weights)``.
    """
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_positive(name: str, value: float, cls: str) -> None:
    """Raise a ValueError naming the class and argument when ``value`` is not positive."""
    if value <= 0:
        raise ValueError(f"{cls}: {name} must be positive, got {value}")


def check_dropout(value: float, cls: str) -> None:
    """Raise a ValueError when a dropout probability is outside [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{cls}: dropout must be in [0, 1), got {value}")
