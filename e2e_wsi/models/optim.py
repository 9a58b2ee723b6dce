"""Learning-rate schedules and parameter groups for end-to-end training."""

from __future__ import annotations

import math

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up followed by cosine annealing, stepped once per optimizer step.

    Built by :class:`~e2e_wsi.models.module.SlideModule` as ``scheduler(optimizer, total_steps)`` so the
    YAML only names the shape of the schedule, never the step count (which depends on the data).

    Args:
        optimizer: The optimizer whose groups' learning rates are scaled.
        total_steps: Optimizer steps in the whole run (``trainer.estimated_stepping_batches``).
        warmup_fraction: Share of ``total_steps`` spent ramping linearly from ~0 to the base rate.
        min_lr_ratio: Final learning rate as a fraction of the base rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(round(warmup_fraction * total_steps))
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def encoder_param_groups(encoder: nn.Module, rest: list[nn.Module], encoder_lr_mult: float) -> list[dict]:
    """Split trainable parameters into an encoder group and a group for everything else.

    The encoder group carries ``lr_mult`` so that, once the optimizer filled in its base rate, the
    module can scale it (the optimizer is built from a YAML callable that only knows one rate).

    Args:
        encoder: The patch encoder.
        rest: Aggregator, head and any other trainable modules.
        encoder_lr_mult: Multiplier on the base learning rate for the encoder (0 freezes it in effect).

    Returns:
        Parameter groups for ``torch.optim`` constructors; empty groups are dropped.
    """
    enc = [p for p in encoder.parameters() if p.requires_grad]
    other = [p for m in rest for p in m.parameters() if p.requires_grad]
    groups = [
        {"params": enc, "lr_mult": encoder_lr_mult, "name": "encoder"},
        {"params": other, "lr_mult": 1.0, "name": "mil"},
    ]
    return [g for g in groups if g["params"]]


def apply_lr_mult(optimizer: Optimizer) -> None:
    """Scale each group's learning rate by its ``lr_mult`` (once, right after construction)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
        group["initial_lr"] = group["lr"]
