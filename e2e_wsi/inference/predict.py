"""Attention and predictions of whole slides, from one model or an ensemble of checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.errors import UserError
from e2e_wsi.inference.attention import SlideAttention, cached_attention, cached_bag, predict_bag
from e2e_wsi.runs.loading import LoadedRun, load_runs
from e2e_wsi.tasks import get_task_spec


@dataclass
class SlidePrediction:
    """What an ensemble says about one slide.

    Attributes:
        slide_id: The slide.
        preds: The task's predictions for the slide, combined over members by the task spec
            (``probs`` [K], ``risk`` [], ``pred`` []).
        attention: Attention over the slide's patches ([H, N]; [1, N] when members differ in heads).
        magnification: [N] magnification of each patch.
        size_level0: [N] side of each patch in level-0 pixels.
    """

    slide_id: str
    preds: dict[str, np.ndarray]
    attention: SlideAttention
    magnification: np.ndarray
    size_level0: np.ndarray

    @property
    def probs(self) -> np.ndarray | None:
        """[K] class probabilities (classification, grading), else ``None``."""
        return self.preds.get("probs")

    @property
    def risk(self) -> float | None:
        """Risk score (survival), else ``None``."""
        return float(self.preds["risk"]) if "risk" in self.preds else None


class Ensemble:
    """One or more trained models that predict together: outputs combined by the task spec (probabilities,
    risks, values averaged) and attention averaged.

    Args:
        members: The loaded models (at least one).

    Members whose runs name their classes (``data.class_names``) in another order are aligned by name
    (each member's probabilities are reordered to the first member's class order before averaging).

    Raises:
        UserError: If members differ in task, number of outputs, class names, or evaluation
            magnifications / patch size (they would not see the same patches); the message names the
            checkpoints.
    """

    def __init__(self, members: Sequence[LoadedRun]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one checkpoint")
        self.members = list(members)
        first = self.members[0]
        for m in self.members[1:]:
            if m.task_kind != first.task_kind:
                raise ValueError(
                    f"checkpoints of different tasks cannot be averaged: {first.checkpoint} is "
                    f"{first.task_kind}, {m.checkpoint} is {m.task_kind}"
                )
            if _outputs(m) != _outputs(first):
                raise ValueError(
                    f"checkpoints predict different numbers of outputs: {first.checkpoint} "
                    f"{_outputs(first)}, {m.checkpoint} {_outputs(m)}"
                )
            if (m.eval_magnifications, m.eval_patch_size, m.eval_crop_fraction) != (
                first.eval_magnifications,
                first.eval_patch_size,
                first.eval_crop_fraction,
            ):
                raise ValueError(
                    f"checkpoints evaluate different patches: {first.checkpoint} "
                    f"{first.eval_magnifications}x/{first.eval_patch_size}px, {m.checkpoint} "
                    f"{m.eval_magnifications}x/{m.eval_patch_size}px"
                )
        self._orders = [class_order(first, m) for m in self.members]

    @classmethod
    def from_runs(cls, run: str | Path | None, ckpts: Sequence[str | Path] | None = None) -> Ensemble:
        """The models of :func:`e2e_wsi.runs.load_runs` (a run, every fold of a crossval folder, or files)."""
        return cls(load_runs(run, ckpts))

    @property
    def task_kind(self) -> str:
        return self.members[0].task_kind

    @property
    def magnifications(self) -> list[float]:
        return self.members[0].eval_magnifications

    @property
    def patch_size(self) -> int:
        return self.members[0].eval_patch_size

    @property
    def class_names(self) -> list[str] | None:
        """Names of the output classes in column order (the first member's), or ``None`` if unnamed."""
        names = self.members[0].data.get("class_names")
        has_classes = get_task_spec(self.task_kind).has_classes
        return [str(n) for n in names] if names and has_classes else None

    @property
    def checkpoints(self) -> list[Path]:
        return [m.checkpoint for m in self.members]

    def predict_slide(self, cache: PatchCache, slide_id: str) -> SlidePrediction:
        """Average the members' predictions and attention over every patch of a cached slide.

        Predictions are combined by the task spec (:meth:`e2e_wsi.tasks.base.TaskSpec.combine`: the
        arithmetic mean of probabilities, risks or values); attention is the mean of the members' [H, N]
        maps when they have the same heads, else of their head-averaged maps ([1, N]).
        """
        item = cached_bag(
            cache, slide_id, self.magnifications, self.patch_size, self.members[0].eval_crop_fraction
        )
        outs = [predict_bag(m.model, item["images"], item["mask"]) for m in self.members]
        maps = [o["attention"][0].float().numpy() for o in outs]
        if len({a.shape for a in maps}) > 1:
            maps = [a.mean(axis=0, keepdims=True) for a in maps]
        attention = cached_attention(cache, slide_id, self.magnifications, item, np.mean(maps, axis=0))
        mags = item["magnification"].numpy()
        meta = cache.meta(slide_id)["magnifications"]
        sizes = np.array([int(meta[mag_key(float(m))]["size_level0"]) for m in mags], dtype=np.int64)
        spec = get_task_spec(self.task_kind)
        members = [
            _aligned({k: o[k][0].double().numpy() for k in spec.prediction_keys}, order)
            for o, order in zip(outs, self._orders, strict=True)
        ]
        return SlidePrediction(slide_id, spec.combine(members), attention, mags, sizes)


def _aligned(preds: dict[str, np.ndarray], order: list[int]) -> dict[str, np.ndarray]:
    """A member's predictions with its class probabilities put in the ensemble's class order."""
    return {**preds, "probs": preds["probs"][order]} if "probs" in preds else preds


def class_order(first: LoadedRun, member: LoadedRun) -> list[int]:
    """Column ``j`` of ``member``'s probabilities that holds ``first``'s class ``i``, for every ``i``.

    Runs without ``data.class_names`` are taken in index order (nothing to align by).

    Raises:
        UserError: If one run names its classes and the other does not, or their names differ.
    """
    k = _outputs(member)
    if not get_task_spec(first.task_kind).has_classes:
        return list(range(k))
    a, b = first.data.get("class_names"), member.data.get("class_names")
    if not a and not b:
        return list(range(k))
    if not a or not b or sorted(map(str, a)) != sorted(map(str, b)):
        raise UserError(
            f"checkpoints predict different classes: {first.checkpoint} has class_names {a}, "
            f"{member.checkpoint} has {b}; an ensemble needs runs trained on the same classes"
        )
    position = {str(name): j for j, name in enumerate(b)}
    return [position[str(name)] for name in a]


def _outputs(member: LoadedRun) -> int:
    task = member.model.task
    return int(getattr(task, "num_classes", getattr(task, "num_bins", 1)))
