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


class EpochCosineLR(LambdaLR):
    """The official schedule: timm's cosine stepped once per epoch, with ``warmup_prefix=False``.

    The official run builds ``create_scheduler_v2(sched="cosine", num_epochs, warmup_lr, warmup_epochs,
    min_lr=1e-7)`` (train_utils.py:94-95; ``warmup_lr`` 1e-6, options.py:75) and steps it with the epoch
    number after every epoch (engines/base_engine.py:253-254). Epoch ``t`` of ``T`` then trains at

    * ``t < w``: ``warmup + t * (base - warmup) / w`` (linear warm-up from ``warmup``),
    * ``t >= w``: ``min + (base - min) * (1 + cos(pi * t / T)) / 2``: the cosine counts epochs from
      the start of the run, not from the end of the warm-up, so right after a warm-up of ``w = 10`` of
      ``T = 75`` epochs the rate is 0.957 x base, not 1.0.

    :class:`~e2e_wsi.models.module.SlideModule` steps it once per epoch (``interval = "epoch"``) and
    gives it ``trainer.max_epochs`` as ``T``.

    Args:
        optimizer: The optimizer; each group's rate is scaled by the same factor.
        total_steps: Unused (the factory signature of every schedule); the length is the epoch count
            given by :meth:`set_epochs` (``SlideModule`` calls it with ``trainer.max_epochs``).
        warmup_epochs: ``w`` (official ``warmup_epochs``).
        warmup_lr_ratio: Warm-up start as a fraction of the base rate (official 1e-6 / lr).
        min_lr_ratio: Final rate as a fraction of the base rate (official 1e-7 / lr).
    """

    interval = "epoch"

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int = 1,
        warmup_epochs: int = 0,
        warmup_lr_ratio: float = 0.0125,
        min_lr_ratio: float = 0.00125,
    ) -> None:
        del total_steps
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0.0 <= min_lr_ratio <= 1.0 or not 0.0 <= warmup_lr_ratio <= 1.0:
            raise ValueError("warmup_lr_ratio and min_lr_ratio must be in [0, 1]")
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_lr_ratio = float(warmup_lr_ratio)
        self.min_lr_ratio = float(min_lr_ratio)
        self.epochs = max(1, self.warmup_epochs + 1)
        super().__init__(optimizer, self._factor)

    def set_epochs(self, epochs: int) -> None:
        """Set ``T``, the run's number of epochs, and re-apply the current epoch's rate."""
        if epochs < 1:
            raise ValueError(f"the run needs at least one epoch, got {epochs}")
        self.epochs = int(epochs)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self._factor(self.last_epoch)

    def _factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr_ratio + epoch * (1.0 - self.warmup_lr_ratio) / self.warmup_epochs
        if epoch >= self.epochs:
            return self.min_lr_ratio
        cosine = 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
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
