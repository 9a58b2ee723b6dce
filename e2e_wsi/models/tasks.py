"""Tasks: what a slide vector is trained to predict.

A task bundles the head it needs, its loss, what it predicts per slide, and which validation metric
selects checkpoints. Everything else about its kind (manifest columns, bag targets, predictions.csv,
the metrics, captions) is the kind's spec in :mod:`e2e_wsi.tasks`, named by :attr:`Task.kind`.
:class:`~e2e_wsi.models.module.SlideModule` holds one task,
chosen in YAML with ``class_path`` (no string switches), and never branches on the task type.

Batches carry ``target`` [B]: the class index (long) for classification and grading, the discrete-time
bin (long) of ``time`` for survival, which also carries ``time`` [B] (float) and ``event`` [B] (float,
1 = observed), the value (float) for regression.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from e2e_wsi.evaluation.torch_metrics import ReportMetric
from e2e_wsi.models.heads import ClassificationHead, RegressionHead, SurvivalHead
from e2e_wsi.models.losses import (
    ClassificationLoss,
    CoxLoss,
    DiscreteTimeSurvivalLoss,
    RegressionLoss,
    hazards_to_risk,
)
from e2e_wsi.tasks import get_task_spec


class Task(ABC):
    """Base class of the prediction tasks: the one place a run's task is stated.

    The CLI derives the data side from it (``data.task`` = :attr:`kind`, ``data.num_classes`` =
    :attr:`num_targets`) and :class:`~e2e_wsi.training.callbacks.BestCheckpoint` selects checkpoints on
    :attr:`monitor` / :attr:`monitor_mode`.

    Attributes:
        kind: The task kind, a registered spec of :mod:`e2e_wsi.tasks` (``classification``,
            ``grading``, ``survival``, ``regression``); also the bootstrap report's task name.
        monitor: Validation metric key that selects checkpoints, e.g. ``val/auroc``.
        monitor_mode: ``max`` or ``min``.
        num_targets_name: The init argument that sets :attr:`num_targets` (for messages).
    """

    kind: str
    monitor: str
    monitor_mode: Literal["min", "max"] = "max"
    num_targets_name: str = "num_classes"

    @property
    def num_targets(self) -> int | None:
        """Distinct targets the data must produce: classes, or survival time bins; ``None`` if unused."""
        return getattr(self, "num_classes", None)

    @abstractmethod
    def build_head(self, in_dim: int) -> nn.Module:
        """Return the head mapping slide vectors [B, in_dim] to raw outputs [B, K]."""

    @abstractmethod
    def build_loss(self) -> nn.Module:
        """Return the loss module used by :meth:`loss`."""

    @abstractmethod
    def loss(self, loss_fn: nn.Module, outputs: Tensor, batch: dict) -> Tensor:
        """Scalar training loss from head outputs [B, K] and the batch targets."""

    def metrics(self) -> MetricCollection:
        """A fresh collection (one per stage) of the spec's report metrics, computed as the report does."""
        spec = get_task_spec(self.kind)
        return MetricCollection(
            {m.name: ReportMetric(self.kind, m.name) for m in spec.metrics}, compute_groups=False
        )

    def update_metrics(self, metrics: MetricCollection | Metric, outputs: Tensor, batch: dict) -> None:
        """Feed one batch of head outputs [B, K] (and the batch's truth) to the stage's metrics."""
        metrics.update(self.predict(outputs), get_task_spec(self.kind).batch_truth(batch))

    @abstractmethod
    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        """Per-slide predictions from head outputs [B, K], keyed by the spec's ``prediction_keys``:
        ``probs`` [B, K], ``risk`` [B] or ``pred`` [B]."""


class ClassificationTask(Task):
    """Subtyping or diagnosis: K classes, softmax cross-entropy.

    Args:
        num_classes: Number of classes K (labels 0..K-1).
        class_weights: Optional per-class loss weights, length K.
        label_smoothing: Cross-entropy label smoothing.
        dropout: Dropout before the head's linear layer.
        head_bias: Bias of the head's linear layer (off, as in the paper's appendix B.3).
    """

    kind = "classification"
    # Validation loss, not AUROC: AUROC saturates at 1.0 on small validation sets and then keeps the
    # first epoch that reached it; the loss keeps ranking checkpoints (issue 11, item 6).
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        num_classes: int = 2,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        head_bias: bool = False,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {num_classes} classes")
        self.num_classes = num_classes
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.dropout = dropout
        self.head_bias = head_bias

    def build_head(self, in_dim: int) -> nn.Module:
        return ClassificationHead(
            in_dim=in_dim, num_classes=self.num_classes, dropout=self.dropout, bias=self.head_bias
        )

    def build_loss(self) -> nn.Module:
        return ClassificationLoss(class_weights=self.class_weights, label_smoothing=self.label_smoothing)

    def loss(self, loss_fn: nn.Module, outputs: Tensor, batch: dict) -> Tensor:
        return loss_fn(outputs, batch["target"])

    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        return {"probs": outputs.float().softmax(-1)}


class GradingTask(ClassificationTask):
    """Ordinal grading (e.g. ISUP 0-5): cross-entropy; balanced accuracy (the official PANDA "Acc"),
    accuracy, unweighted kappa (the official "CK") and quadratic weighted kappa."""

    kind = "grading"
    # Validation loss: QWK on a small validation set jumps between a few values and ties often.
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        num_classes: int = 6,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        head_bias: bool = False,
    ) -> None:
        super().__init__(num_classes, class_weights, label_smoothing, dropout, head_bias)


class _SurvivalTask(Task):
    kind = "survival"
    monitor = "val/c_index"


class DiscreteSurvivalTask(_SurvivalTask):
    """Survival with a discrete-time hazard head (NLL over time bins).

    Bins come from quantiles of the uncensored training times (computed by the datamodule, which
    puts each case's bin index in the batch). Risk is minus the sum of the survival curve.

    Args:
        num_bins: Number of time bins K (must match the datamodule's ``survival_bins``).
        alpha: Extra weight on the uncensored term of the NLL.
        dropout: Dropout before the head's linear layer.
        head_bias: Bias of the head's linear layer (off, as in the paper's appendix B.3).
    """

    # The NLL over time bins does not saturate; the c-index of a small validation set moves in coarse
    # steps and ties.
    monitor = "val/loss"
    monitor_mode = "min"
    num_targets_name = "num_bins"

    def __init__(
        self, num_bins: int = 4, alpha: float = 0.0, dropout: float = 0.0, head_bias: bool = False
    ) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.alpha = alpha
        self.dropout = dropout
        self.head_bias = head_bias

    @property
    def num_targets(self) -> int:
        return self.num_bins

    def build_head(self, in_dim: int) -> nn.Module:
        return SurvivalHead(in_dim=in_dim, num_bins=self.num_bins, dropout=self.dropout, bias=self.head_bias)

    def build_loss(self) -> nn.Module:
        return DiscreteTimeSurvivalLoss(alpha=self.alpha)

    def loss(self, loss_fn: nn.Module, outputs: Tensor, batch: dict) -> Tensor:
        return loss_fn(outputs, batch["target"], batch["event"])

    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        return {"risk": hazards_to_risk(outputs.float())}


class CoxSurvivalTask(_SurvivalTask):
    """Survival with a single risk output and the Cox partial-likelihood loss over the batch.

    The Cox loss needs several cases per batch with at least one event; use ``batch_size`` > 1.

    Args:
        dropout: Dropout before the head's linear layer.
        head_bias: Bias of the head's linear layer (off, as in the paper; a Cox risk needs none).
    """

    # Kept on the c-index: the Cox partial likelihood of a validation batch depends on how cases are
    # batched, so its loss does not compare across epochs the way a per-case NLL does.

    def __init__(self, dropout: float = 0.0, head_bias: bool = False) -> None:
        self.dropout = dropout
        self.head_bias = head_bias

    def build_head(self, in_dim: int) -> nn.Module:
        return SurvivalHead(in_dim=in_dim, num_bins=1, dropout=self.dropout, bias=self.head_bias)

    def build_loss(self) -> nn.Module:
        return CoxLoss()

    def loss(self, loss_fn: nn.Module, outputs: Tensor, batch: dict) -> Tensor:
        return loss_fn(outputs[:, 0], batch["time"], batch["event"])

    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        return {"risk": outputs[:, 0].float()}


class RegressionTask(Task):
    """A continuous target per slide (a biomarker score), MSE or Huber loss.

    The head predicts in standardised units, ``(target - target_offset) / target_scale``, so targets of
    any scale train at the learning rates of the classification recipes; predictions are mapped back.
    Set ``target_offset``/``target_scale`` near the training targets' mean and standard deviation.

    Args:
        loss: ``mse`` or ``huber``.
        huber_delta: Huber threshold, in standardised units.
        target_offset: Subtracted from the targets before the loss (added back to predictions).
        target_scale: Divides the targets before the loss (multiplies predictions); > 0.
        dropout: Dropout before the head's linear layer.
        head_bias: Bias (intercept) of the head's linear layer; on by default, unlike the classification
            heads, because a value needs an intercept that the bias-free MIL layers do not give.
    """

    kind = "regression"
    # The validation loss: r and rho of a small validation set move in coarse steps.
    monitor = "val/loss"
    monitor_mode = "min"
    num_targets_name = "outputs"

    def __init__(
        self,
        loss: Literal["mse", "huber"] = "mse",
        huber_delta: float = 1.0,
        target_offset: float = 0.0,
        target_scale: float = 1.0,
        dropout: float = 0.0,
        head_bias: bool = True,
    ) -> None:
        if not target_scale > 0:
            raise ValueError(f"target_scale must be > 0, got {target_scale}")
        self.loss_kind = loss
        self.huber_delta = huber_delta
        self.target_offset = float(target_offset)
        self.target_scale = float(target_scale)
        self.dropout = dropout
        self.head_bias = head_bias
        RegressionLoss(loss, huber_delta)  # check the options now, not at the first step

    def build_head(self, in_dim: int) -> nn.Module:
        return RegressionHead(in_dim=in_dim, dropout=self.dropout, bias=self.head_bias)

    def build_loss(self) -> nn.Module:
        return RegressionLoss(self.loss_kind, self.huber_delta)

    def loss(self, loss_fn: nn.Module, outputs: Tensor, batch: dict) -> Tensor:
        standardised = (batch["target"].float() - self.target_offset) / self.target_scale
        return loss_fn(outputs[:, 0], standardised)

    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        return {"pred": self.target_offset + self.target_scale * outputs[:, 0].float()}


def default_task(task: Task | None) -> Task:
    """``task``, or the default of :class:`~e2e_wsi.models.module.SlideModule`: ``ClassificationTask()``."""
    return task if task is not None else ClassificationTask()


__all__ = [
    "Task",
    "ClassificationTask",
    "GradingTask",
    "DiscreteSurvivalTask",
    "CoxSurvivalTask",
    "RegressionTask",
    "default_task",
]
