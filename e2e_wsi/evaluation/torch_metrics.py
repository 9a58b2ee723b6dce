"""torchmetrics ``Metric`` classes that torchmetrics itself does not ship (gathered across DDP ranks)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAUROC
from torchmetrics.utilities import dim_zero_cat


def harrell_c_index(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Harrell's concordance index, higher ``risk`` meaning shorter survival.

    A pair (i, j) is comparable when i had the event and either died first or tied with a censored j
    (the censored subject is known to have lived at least as long). Concordant pairs count 1, risk ties 0.5.

    Args:
        risk: [n] predicted risk.
        time: [n] observed times.
        event: [n] 1 for an observed event, 0 for censoring.

    Returns:
        Scalar tensor; NaN when there is no comparable pair.
    """
    risk, time, event = risk.double(), time.double(), event.bool()
    earlier = time[:, None] < time[None, :]
    tied_vs_censored = (time[:, None] == time[None, :]) & ~event[None, :]
    comparable = event[:, None] & (earlier | tied_vs_censored)
    comparable.fill_diagonal_(False)
    diff = risk[:, None] - risk[None, :]
    score = (diff > 0).double() + 0.5 * (diff == 0).double()
    n_pairs = comparable.sum()
    if n_pairs == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (score * comparable).sum() / n_pairs


class ConcordanceIndex(Metric):
    """Harrell's C-index accumulated over an epoch; states are concatenated across ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("time", default=[], dist_reduce_fx="cat")
        self.add_state("event", default=[], dist_reduce_fx="cat")

    def update(self, risk: Tensor, time: Tensor, event: Tensor) -> None:
        """Add a batch: ``risk``, ``time`` and ``event`` each [B]."""
        self.risk.append(risk.detach().flatten().float())
        self.time.append(time.detach().flatten().float())
        self.event.append(event.detach().flatten().float())

    def compute(self) -> Tensor:
        return harrell_c_index(
            dim_zero_cat(self.risk), dim_zero_cat(self.time), dim_zero_cat(self.event)
        ).float()


class DefinedMulticlassAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC that is NaN (undefined) unless every class occurs in the targets.

    torchmetrics returns 0.0 for a split holding a single class, which reads as "worst possible" and
    keeps checkpoint selection on ``val/auroc`` at epoch 0. The AUROC of a class without positives or
    negatives is undefined; like :func:`e2e_wsi.evaluation.metrics.auroc` (the test report), the macro
    average is then NaN. A warning says so once per process; checkpoint selection skips NaN
    (:class:`e2e_wsi.training.callbacks.DefinedMetricCheckpoint`).
    """

    _warned = False

    def compute(self) -> Tensor:
        present = self._classes_present()
        if present is not None and int(present.sum()) < self.num_classes:
            if not DefinedMulticlassAUROC._warned:
                DefinedMulticlassAUROC._warned = True
                warnings.warn(
                    f"AUROC is undefined (logged as NaN): the evaluated slides hold only classes "
                    f"{present.nonzero().flatten().tolist()} of {self.num_classes}; put slides of every "
                    "class in the validation split (checkpoints are not selected on undefined values)",
                    UserWarning,
                    stacklevel=2,
                )
            return torch.tensor(float("nan"), device=self.device)
        return super().compute()

    def _classes_present(self) -> Tensor | None:
        """[K] bool: classes with at least one target in the (gathered) states; None without updates."""
        if self.thresholds is None:
            if isinstance(self.target, list) and not self.target:
                return None
            target = dim_zero_cat(self.target).long()  # a list, or one tensor after a DDP sync
            if self.ignore_index is not None:
                target = target[target != self.ignore_index]
            return torch.bincount(target, minlength=self.num_classes)[: self.num_classes] > 0
        # Binned states: confmat [T, K, 2, 2]; row 1 of a class's matrix counts its positives.
        return self.confmat[0, :, 1, :].sum(-1) > 0
