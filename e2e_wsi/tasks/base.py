"""``TaskSpec``: everything about a task kind that is not the torch side (head, loss stay in ``models``).

A spec owns, for one task kind: the manifest's truth columns and their checks, the bag targets (fitted
on the training bags, e.g. survival time bins), the columns of ``predictions.csv`` and their checks,
the report's metrics, how an ensemble combines its members' outputs, the heatmap caption and the
synthetic cohorts that train as it. Code elsewhere asks the spec (:func:`e2e_wsi.tasks.get_task_spec`)
instead of branching on the kind's name.

Shapes: per-unit predictions come from :meth:`e2e_wsi.models.tasks.Task.predict` as a dict of arrays
whose keys are :attr:`TaskSpec.prediction_keys` (``probs`` [n, K], ``risk`` [n], ``pred`` [n]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from e2e_wsi.tasks import _checks as C

if TYPE_CHECKING:  # torch is imported by the methods that need it: `e2e-wsi synth` workers do not
    import torch

Arrays = Mapping[str, np.ndarray]
MetricFn = Callable[[Arrays, "np.ndarray | None"], np.ndarray]
BagUnit = tuple[str, tuple[str, ...], dict[str, float | int]]  # (bag_id, slide_ids, targets)


@dataclass(frozen=True)
class MetricDef:
    """One reported metric.

    Attributes:
        name: Key in ``metrics.json`` and the logged ``val/<name>``, ``test/<name>``.
        fn: ``(arrays, weights [R, n] | None) -> [R]`` (``NaN`` where undefined); ``arrays`` come from
            :meth:`TaskSpec.metric_arrays`.
        why_undefined: Optional ``arrays -> message`` shown once when the value is ``NaN`` in training.
    """

    name: str
    fn: MetricFn
    why_undefined: Callable[[Arrays], str] | None = None


@dataclass(frozen=True)
class SynthCohort:
    """A synthetic cohort kind (``e2e-wsi synth --task NAME``) that trains as the spec's task kind.

    Attributes:
        name: The cohort's name on the command line.
        outcomes: ``None`` for the labelled cohorts painted by :mod:`e2e_wsi.synth.render` (class or
            grade per case, manifest column ``label``). Otherwise the cohort is *score-driven*: each
            case draws a score in [0, 1] that sets its lesion burden and morphology, and
            ``outcomes(rng, score [C], burden [C])`` returns the manifest's truth columns, one list
            of C strings per column (e.g. ``time``/``event``, or ``target``).
    """

    name: str
    outcomes: Callable[[np.random.Generator, np.ndarray, np.ndarray], dict[str, list[str]]] | None = None


class TaskSpec(ABC):
    """The data-side description of one task kind; subclasses register with ``@register_task_spec``.

    Attributes:
        kind: The task kind (``model.task``'s ``kind``, ``data.task``, the report's ``task``).
        description: One line for docs and help.
        id_columns: Leading columns of ``predictions.csv`` (``case_id, slide_id``; ``case_id`` when a
            unit is a case).
        unit_column: The column naming one unit (bag, predictions row).
        manifest_columns: Truth columns the manifest must have.
        truth_columns: Truth columns of ``predictions.csv`` (after the id columns).
        prediction_keys: Keys of ``Task.predict``.
        main_prediction_column: The first prediction column (of an empty ``predictions.csv``).
        main_metric: The metric two runs are compared on.
        metrics: The reported metrics, in report order.
        default_num_targets: ``data.num_classes`` when the task gives none (survival: 4 bins).
        has_classes: Bags carry a class index in ``target`` (class oversampling applies).
        synth_cohorts: Synthetic cohorts that train as this kind.
    """

    kind: ClassVar[str]
    description: ClassVar[str]
    id_columns: ClassVar[tuple[str, ...]] = ("case_id", "slide_id")
    unit_column: ClassVar[str] = "slide_id"
    manifest_columns: ClassVar[tuple[str, ...]]
    truth_columns: ClassVar[tuple[str, ...]]
    prediction_keys: ClassVar[tuple[str, ...]]
    main_prediction_column: ClassVar[str]
    main_metric: ClassVar[str]
    metrics: ClassVar[tuple[MetricDef, ...]]
    default_num_targets: ClassVar[int | None] = None
    has_classes: ClassVar[bool] = False
    synth_cohorts: ClassVar[tuple[SynthCohort, ...]] = ()

    # ------------------------------------------------------------------------------------ manifest
    @abstractmethod
    def parse_manifest(
        self,
        df: pd.DataFrame,
        errors: list[str],
        num_targets: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Parse the truth columns of a manifest in place (nullable dtypes), appending one message per
        bad row to ``errors`` (rows named with :func:`e2e_wsi.tasks._checks.where`)."""

    @abstractmethod
    def finish_manifest(self, df: pd.DataFrame) -> None:
        """Cast the parsed truth columns of an error-free manifest to their final dtypes, in place."""

    def num_classes(self, df: pd.DataFrame, given: int | None) -> int | None:
        """The data module's ``num_classes`` after the manifest is read (``given``, or inferred)."""
        return given if given is not None else self.default_num_targets

    # ---------------------------------------------------------------------------------------- bags
    def bag_units(self, df: pd.DataFrame) -> list[BagUnit]:
        """One bag per slide with the spec's targets; case-unit kinds override."""
        return [
            (str(row["slide_id"]), (str(row["slide_id"]),), self.row_targets(row))
            for row in df.to_dict("records")
        ]

    def row_targets(self, row: Mapping[str, Any]) -> dict[str, float | int]:
        """Targets of a slide-unit bag from its manifest row (Python int -> int64, float -> float32)."""
        raise NotImplementedError(f"{type(self).__name__} makes its bags in bag_units")

    def fit_targets(self, train: list[BagUnit], num_targets: int | None) -> dict[str, Any]:
        """State fitted on the training bags that :meth:`finish_targets` needs (e.g. time-bin edges)."""
        return {}

    def finish_targets(self, targets: dict[str, float | int], state: Mapping[str, Any]) -> dict:
        """A bag's targets with the fitted ones added (default: unchanged)."""
        return targets

    @abstractmethod
    def truth_row(self, targets: Mapping[str, float | int]) -> dict[str, float | int]:
        """The truth columns of ``predictions.csv`` from a bag's targets."""

    def train_targets(self, targets: list[Mapping[str, float | int]]) -> torch.Tensor:
        """The training bags' ``target`` values as one tensor [n]."""
        import torch

        return torch.tensor([t["target"] for t in targets])

    @abstractmethod
    def batch_truth(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Truth columns (each [B]) from a training/evaluation batch."""

    # --------------------------------------------------------------------------------- predictions
    @abstractmethod
    def prediction_columns(self, preds: Mapping[str, np.ndarray]) -> dict[str, list]:
        """Flatten per-unit predictions (:attr:`prediction_keys`) into ``predictions.csv`` columns."""

    @abstractmethod
    def validate_predictions(self, df: pd.DataFrame, source: str) -> pd.DataFrame:
        """Check a ``predictions.csv`` frame; return a typed copy holding the layout's columns only.

        Raises:
            ValueError: Naming ``source``, the column and the CSV line of the first problem.
        """

    def recognises(self, columns: set[str]) -> bool:
        """Whether a predictions file with these columns is surely of this kind (no ``task`` given)."""
        return False

    @abstractmethod
    def metric_arrays(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """The arrays the metric functions take, from a validated predictions frame."""

    def metric(self, name: str) -> MetricDef:
        """The metric called ``name``.

        Raises:
            ValueError: If the kind does not report it.
        """
        for m in self.metrics:
            if m.name == name:
                return m
        raise ValueError(
            f"metric {name!r} is not reported for task {self.kind!r}; use one of {[m.name for m in self.metrics]}"
        )

    # ---------------------------------------------------------------------------- ensemble, caption
    def combine(self, members: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One unit's predictions from an ensemble's members: the arithmetic mean of each key."""
        return {k: np.mean([np.asarray(m[k], dtype=np.float64) for m in members], axis=0) for k in members[0]}

    @abstractmethod
    def caption(self, prediction: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None) -> str:
        """What a heatmap says about one slide's prediction, e.g. ``predicted: tumour (p = 0.999)``."""

    # ----------------------------------------------------------------------------------- helpers
    def _frame(self, df: pd.DataFrame, columns: Sequence[str], source: str) -> pd.DataFrame:
        """The id + ``columns`` of ``df``, present and non-empty, ids checked and unique per unit."""
        C.require(df, [*self.id_columns, *columns], source)
        out = df[[*self.id_columns, *columns]].copy()
        for col in self.id_columns:
            out[col] = out[col].astype(str)
            C.check_ids(out, col, source)
        C.check_unique(out, self.unit_column, source)
        return out


__all__ = ["Arrays", "BagUnit", "MetricDef", "MetricFn", "SynthCohort", "TaskSpec"]
