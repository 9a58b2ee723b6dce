"""Classification and grading: one class per slide, manifest ``label``, predictions ``pred, prob_0..``."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from e2e_wsi.tasks import _checks as C
from e2e_wsi.tasks import metrics as M
from e2e_wsi.tasks import register_task_spec
from e2e_wsi.tasks.base import Arrays, MetricDef, SynthCohort, TaskSpec

if TYPE_CHECKING:  # torch is imported by the methods that need it: `e2e-wsi synth` workers do not
    import torch

# Probabilities written as CSV text with a few decimals still sum to 1 within this.
PROB_SUM_TOLERANCE = 1e-3
_PROB_COLUMN = re.compile(r"prob_(\d+)")


def prob_columns(df: pd.DataFrame, source: str = "predictions") -> list[str]:
    """Return ``prob_0 .. prob_{K-1}`` of a classification frame, in class order.

    Raises:
        ValueError: If there are fewer than two or the indices are not ``0 .. K-1``.
    """
    indices = sorted(int(m.group(1)) for c in df.columns if (m := _PROB_COLUMN.fullmatch(str(c))))
    if len(indices) < 2 or indices != list(range(len(indices))):
        found = [str(c) for c in df.columns if str(c).startswith("prob_")]
        raise ValueError(
            f"{source}: expected probability columns prob_0 .. prob_{{K-1}} with K >= 2, found {found}; "
            "write one column per class in the config's class order"
        )
    return [f"prob_{k}" for k in indices]


def _labelled(fn) -> MetricDef:
    """A metric of (labels, argmax predictions, K)."""

    def score(a: Arrays, w: np.ndarray | None) -> np.ndarray:
        return fn(a["label"], a["pred"], a["probs"].shape[1], w)

    return MetricDef(fn.__name__, score)


def _auroc(a: Arrays, w: np.ndarray | None) -> np.ndarray:
    return M.auroc(a["label"], a["probs"], w)


def _missing_classes(a: Arrays) -> str:
    k = a["probs"].shape[1]
    present = sorted(int(c) for c in np.unique(a["label"]))
    return (
        f"AUROC is undefined (logged as NaN): the evaluated slides hold only classes {present} of {k}; "
        "put slides of every class in the validation split (checkpoints are not selected on undefined values)"
    )


AUROC = MetricDef("auroc", _auroc, _missing_classes)
ACCURACY = _labelled(M.accuracy)
BALANCED_ACCURACY = _labelled(M.balanced_accuracy)
F1_MACRO = _labelled(M.f1_macro)
QWK = MetricDef("qwk", _labelled(M.quadratic_weighted_kappa).fn)
KAPPA = MetricDef("kappa", _labelled(M.unweighted_kappa).fn)


@register_task_spec
class ClassificationSpec(TaskSpec):
    """One class per slide (subtyping, diagnosis)."""

    kind = "classification"
    description = "one class per slide (subtyping, diagnosis); AUROC, accuracy, balanced accuracy, F1"
    manifest_columns = ("label",)
    truth_columns = ("label",)
    prediction_keys = ("probs",)
    main_prediction_column = "pred"
    has_classes = True
    # The paper reports AUC for sub-typing.
    main_metric = "auroc"
    metrics = (AUROC, ACCURACY, BALANCED_ACCURACY, F1_MACRO)
    synth_cohorts = (SynthCohort("subtype"), SynthCohort("diagnosis"))

    # ---------------------------------------------------------------------------------- manifest
    def parse_manifest(
        self,
        df: pd.DataFrame,
        errors: list[str],
        num_targets: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """``label``: an integer 0..K-1 or one of ``class_names``; every class must have a slide."""
        names = {name: i for i, name in enumerate(class_names)} if class_names else {}
        if class_names is not None and num_targets is not None and len(class_names) != num_targets:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_targets}")
        k = num_targets if num_targets is not None else (len(class_names) if class_names else None)
        parsed: list[int | None] = []
        for _, row in df.iterrows():
            raw = row["label"]
            value = names.get(raw) if isinstance(raw, str) and raw in names else C.parse_int(raw)
            if value is None:
                hint = f" (known names: {list(class_names)})" if class_names else " (use an integer 0..K-1)"
                errors.append(f"{C.where(row)}: label {raw!r} is missing or unknown{hint}")
            elif value < 0 or (k is not None and value >= k):
                errors.append(f"{C.where(row)}: label {value} is outside 0..{(k or 1) - 1}")
                value = None
            parsed.append(value)
        valid = [v for v in parsed if v is not None]
        if k is None:
            k = max(valid) + 1 if valid else 0
        df["label"] = pd.array(parsed, dtype="Int64")
        counts = np.bincount(np.asarray(valid, dtype=np.int64), minlength=k) if k else np.zeros(0)
        for cls in np.flatnonzero(counts == 0):
            name = f" ({class_names[cls]!r})" if class_names else ""
            errors.append(
                f"class {cls}{name} has no slide in the manifest: fix num_classes/class_names or the labels"
            )

    def finish_manifest(self, df: pd.DataFrame) -> None:
        df["label"] = df["label"].astype("int64")

    def num_classes(self, df: pd.DataFrame, given: int | None) -> int | None:
        return given if given is not None else int(df["label"].max()) + 1

    # -------------------------------------------------------------------------------------- bags
    def row_targets(self, row: Mapping[str, object]) -> dict[str, float | int]:
        return {"target": int(row["label"])}  # type: ignore[call-overload]

    def truth_row(self, targets: Mapping[str, float | int]) -> dict[str, float | int]:
        return {"label": int(targets["target"])}

    def train_targets(self, targets: list[Mapping[str, float | int]]) -> torch.Tensor:
        import torch

        return torch.tensor([t["target"] for t in targets], dtype=torch.int64)

    def batch_truth(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"label": batch["target"]}

    # ------------------------------------------------------------------------------- predictions
    def prediction_columns(self, preds: Mapping[str, np.ndarray]) -> dict[str, list]:
        """``pred`` (argmax) and ``prob_0 .. prob_{K-1}`` from ``probs`` [n, K]."""
        if "probs" not in preds:
            raise ValueError(f"{self.kind} predictions need 'probs' (got {sorted(preds)})")
        probs = np.asarray(preds["probs"], dtype=np.float64)
        cols: dict[str, list] = {"pred": probs.argmax(-1).tolist()}
        for k in range(probs.shape[-1]):
            cols[f"prob_{k}"] = probs[:, k].tolist()
        return cols

    def validate_predictions(self, df: pd.DataFrame, source: str) -> pd.DataFrame:
        """``case_id,slide_id,label,pred,prob_0..``: labels and preds in [0, K), probabilities sum to 1."""
        probs = prob_columns(df, source)
        out = self._frame(df, ["label", "pred", *probs], source)
        k = len(probs)
        for col in ("label", "pred"):
            values = C.as_numbers(out, col, source, integer=True)
            bad = (values < 0) | (values >= k)
            if bad.any():
                line = C.line_of(out, bad)
                raise ValueError(
                    f"{source}: {col} {int(values[line - 2])} at line {line} is outside [0, {k - 1}] "
                    f"(K = {k} prob columns)"
                )
            out[col] = values.astype(np.int64)
        matrix = np.stack([C.as_numbers(out, c, source, integer=False) for c in probs], axis=1)
        bad = ((matrix < -PROB_SUM_TOLERANCE) | (matrix > 1 + PROB_SUM_TOLERANCE)).any(axis=1)
        if bad.any():
            raise ValueError(f"{source}: probabilities at line {C.line_of(out, bad)} are outside [0, 1]")
        sums = matrix.sum(axis=1)
        bad = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
        if bad.any():
            line = C.line_of(out, bad)
            raise ValueError(
                f"{source}: probabilities at line {line} sum to {sums[line - 2]:.6f}, not 1 (tolerance "
                f"{PROB_SUM_TOLERANCE}); write softmax outputs, not logits"
            )
        out[probs] = matrix
        return out.reset_index(drop=True)

    def metric_arrays(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        return {
            "label": df["label"].to_numpy(np.int64),
            "pred": df["pred"].to_numpy(np.int64),
            "probs": df[prob_columns(df)].to_numpy(np.float64),
        }

    # ---------------------------------------------------------------------------------- caption
    def caption(self, prediction: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None) -> str:
        """``predicted: <class> (p = 0.999)``: the argmax class and its probability."""
        probs = np.asarray(prediction["probs"], dtype=np.float64).reshape(-1)
        k = int(np.argmax(probs))
        if class_names is not None and len(class_names) != len(probs):
            raise ValueError(f"{len(class_names)} class names for {len(probs)} classes")
        name = class_names[k] if class_names is not None else f"class {k}"
        return f"predicted: {name} (p = {probs[k]:.3f})"


@register_task_spec
class GradingSpec(ClassificationSpec):
    """An ordinal class per slide (e.g. ISUP 0-5): balanced accuracy, accuracy, Cohen's kappa, QWK."""

    kind = "grading"
    description = (
        "an ordinal class per slide (e.g. ISUP 0-5); balanced accuracy, accuracy, kappa, quadratic kappa"
    )
    # The paper's PANDA "Acc" is the official class-averaged accuracy: torchmetrics
    # Accuracy(task="multiclass", average="macro") (engines/metrics.py:145), with unweighted kappa as "CK"
    # (engines/metrics.py:150); the challenge's quadratic kappa is reported beside them.
    main_metric = "balanced_accuracy"
    metrics = (BALANCED_ACCURACY, ACCURACY, KAPPA, QWK)
    synth_cohorts = (SynthCohort("grade"),)
