"""The report's metrics as torchmetrics ``Metric`` objects, for the values logged during training.

:class:`ReportMetric` collects per-unit predictions and truth over an epoch (gathered across DDP ranks),
builds the ``predictions.csv`` frame with the task spec and scores it with the same function the
bootstrap report uses (:mod:`e2e_wsi.tasks.metrics`): each metric has one implementation.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from e2e_wsi.tasks import get_task_spec


class ReportMetric(Metric):
    """One metric of a task spec, accumulated over an epoch.

    Undefined values (e.g. AUROC of a split holding one class) are NaN, never 0: checkpoint selection
    skips them (:class:`e2e_wsi.training.callbacks.DefinedMetricCheckpoint`). When the metric says why
    it is undefined, a warning says so once per process and metric.

    Args:
        kind: The task kind.
        name: The metric's name in the spec (``auroc``, ``c_index``, ``pearson_r``, ...).
    """

    is_differentiable = False
    full_state_update = False
    _warned: set[tuple[str, str]] = set()

    def __init__(self, kind: str, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = get_task_spec(kind)
        self.definition = self.spec.metric(name)
        self.keys = (*self.spec.prediction_keys, *self.spec.truth_columns)
        for key in self.keys:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, preds: Mapping[str, Tensor], truth: Mapping[str, Tensor]) -> None:
        """Add a batch: the task's predictions (``probs`` [B, K], ``risk`` [B], ...) and truth columns [B]."""
        values = {**preds, **truth}
        for key in self.keys:
            getattr(self, key).append(values[key].detach().float())

    def frame(self) -> pd.DataFrame | None:
        """The epoch's units in the ``predictions.csv`` layout (no id columns); ``None`` when empty."""
        arrays = {}
        for key in self.keys:
            state = getattr(self, key)
            if isinstance(state, list) and not state:
                return None
            arrays[key] = dim_zero_cat(state).cpu().double().numpy()  # a list, or one tensor after a sync
        if len(arrays[self.keys[0]]) == 0:
            return None
        preds = {k: arrays[k] for k in self.spec.prediction_keys}
        truth = {k: arrays[k] for k in self.spec.truth_columns}
        return pd.DataFrame({**truth, **self.spec.prediction_columns(preds)})

    def compute(self) -> Tensor:
        frame = self.frame()
        if frame is None:
            return torch.tensor(float("nan"), device=self.device)
        arrays = self.spec.metric_arrays(frame)
        value = float(self.definition.fn(arrays, None)[0])
        if np.isnan(value) and self.definition.why_undefined is not None:
            key = (self.spec.kind, self.definition.name)
            if key not in ReportMetric._warned:
                ReportMetric._warned.add(key)
                warnings.warn(self.definition.why_undefined(arrays), UserWarning, stacklevel=2)
        return torch.tensor(value, dtype=torch.float32, device=self.device)


__all__ = ["ReportMetric"]
