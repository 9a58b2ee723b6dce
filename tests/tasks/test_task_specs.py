"""One loop over every registered task spec (timm style): a new task kind is tested here without editing
this file. Each kind goes manifest -> bags -> batch -> loss -> predictions.csv -> report, through its spec
and its ``model.task`` class, and its logged (torchmetrics) metrics equal its report's point estimates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from e2e_wsi.data.datasets import _target_tensors
from e2e_wsi.data.manifest import load_manifest
from e2e_wsi.errors import UserError
from e2e_wsi.evaluation.bootstrap import bootstrap_report
from e2e_wsi.evaluation.report import predictions_frame, read_predictions, write_predictions
from e2e_wsi.models.tasks import Task
from e2e_wsi.tasks import get_task_spec, task_specs
from e2e_wsi.tasks.base import TaskSpec

SPECS = sorted(task_specs())
N_CASES = 24


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def torch_tasks(kind: str) -> list[Task]:
    """Every ``model.task`` class of ``kind``, built with its defaults."""
    return [
        c() for c in _subclasses(Task) if getattr(c, "kind", None) == kind and not c.__name__.startswith("_")
    ]


def truth_columns(spec: TaskSpec, task: Task, rng: np.random.Generator) -> dict[str, list[str]]:
    """Per-case manifest truth from the kind's first synthetic cohort (labels 0..K-1 for a labelled one)."""
    cohort = spec.synth_cohorts[0]
    if cohort.outcomes is None:
        k = task.num_targets or 2
        return {"label": [str(c % k) for c in rng.permutation(N_CASES)]}
    scores = (rng.permutation(N_CASES) + rng.random(N_CASES)) / N_CASES
    return cohort.outcomes(rng, scores, 0.01 + 0.05 * scores)


def write_manifest(path: Path, truth: dict[str, list[str]], slides_per_case: int = 2) -> Path:
    rows = []
    for c in range(N_CASES):
        for s in range(slides_per_case):
            rows.append({"case_id": f"c{c}", "slide_id": f"c{c}-s{s}", **{k: v[c] for k, v in truth.items()}})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_registry_lists_every_kind_once_and_refuses_unknown_ones() -> None:
    assert {"classification", "grading", "survival", "regression"} <= set(SPECS)
    for kind in SPECS:
        assert get_task_spec(kind).kind == kind
    with pytest.raises(UserError, match=r"unknown task 'segmentation'.*classification"):
        get_task_spec("segmentation")
    with pytest.raises(UserError, match="trains as 'classification'"):
        get_task_spec("subtype")  # a synthetic cohort's name, not a task kind


@pytest.mark.parametrize("kind", SPECS)
def test_task_kind_round_trip(kind: str, tmp_path: Path) -> None:
    spec = get_task_spec(kind)
    tasks = torch_tasks(kind)
    assert tasks, f"no model.task class has kind {kind!r}"
    assert spec.synth_cohorts, f"{kind} has no synthetic cohort"
    rng = np.random.default_rng(0)
    for task in tasks:
        truth = truth_columns(spec, task, rng)
        assert set(truth) == set(spec.manifest_columns)
        num_classes = task.num_targets if spec.has_classes else None

        # Manifest: parsed and typed; a broken truth cell is named by line.
        df = load_manifest(write_manifest(tmp_path / "m.csv", truth), kind, num_classes)
        for col in spec.manifest_columns:
            assert np.isfinite(df[col].to_numpy(dtype=np.float64)).all()
        broken = {k: ["oops", *v[1:]] for k, v in truth.items()}
        with pytest.raises(ValueError, match=r"line 2 \(slide_id 'c0-s0'\)"):
            load_manifest(write_manifest(tmp_path / "bad.csv", broken), kind, num_classes)

        # Bags and targets: fitted on the bags, collated into a batch the task's loss takes.
        units = spec.bag_units(df)
        unit_count = N_CASES if spec.unit_column == "case_id" else 2 * N_CASES
        assert len(units) == unit_count
        state = spec.fit_targets(units, task.num_targets or spec.default_num_targets)
        targets = [spec.finish_targets(t, state) for _, _, t in units]
        items = [_target_tensors(t) for t in targets]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        head = task.build_head(8)
        torch.manual_seed(0)
        outputs = head(torch.randn(len(units), 8))
        loss = task.loss(task.build_loss(), outputs, batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert set(spec.batch_truth(batch)) == set(spec.truth_columns)

        # predictions.csv: ids, truth and prediction columns, written and read back by kind.
        preds = {k: v.detach().numpy() for k, v in task.predict(outputs).items()}
        assert set(preds) == set(spec.prediction_keys)
        eval_units = pd.DataFrame(
            [
                {
                    "case_id": str(df.set_index("slide_id").loc[s[0], "case_id"]),
                    "slide_id": b,
                    **spec.truth_row(t),
                }
                for (b, s, _), t in zip(units, targets, strict=True)
            ]
        )
        frame = predictions_frame(eval_units, kind, {"index": np.arange(len(units)), **preds})
        assert list(frame.columns[: len(spec.id_columns) + len(spec.truth_columns)]) == [
            *spec.id_columns,
            *spec.truth_columns,
        ]
        assert spec.main_prediction_column in frame.columns
        path = write_predictions(frame, tmp_path / "run" / "predictions.csv")
        read, read_kind = read_predictions(path, kind)
        assert read_kind == kind and len(read) == len(units)
        if spec.recognises(set(frame.columns)):
            assert read_predictions(path)[1] == kind  # found from the columns alone

        # Report metrics: the spec's, and the values logged in training are the report's point estimates.
        report = bootstrap_report(read, kind, n_resamples=50, seed=0)
        assert list(report["metrics"]) == [m.name for m in spec.metrics]
        assert spec.main_metric in report["metrics"]
        metrics = task.metrics()
        half = len(units) // 2
        for rows in (slice(0, half), slice(half, None)):  # two batches, concatenated by the metric
            task.update_metrics(metrics, outputs[rows].detach(), {k: v[rows] for k, v in batch.items()})
        logged = metrics.compute()
        for name, m in report["metrics"].items():
            assert np.isfinite(m["point"]), name
            assert float(logged[name]) == pytest.approx(m["point"], rel=1e-5, abs=1e-6), name

        # Ensembles average the members; the caption names the prediction.
        one = {k: v[0] for k, v in preds.items()}
        other = {k: np.asarray(v[1]) for k, v in preds.items()}
        mixed = spec.combine([one, other])
        for k in spec.prediction_keys:
            np.testing.assert_allclose(mixed[k], (np.asarray(one[k]) + other[k]) / 2)
        assert spec.caption(one).startswith("predicted")


def test_loop_discriminates() -> None:
    """Self-check: the logged-vs-report comparison above fails when the two sides see different data."""
    spec = get_task_spec("classification")
    task = torch_tasks("classification")[0]
    torch.manual_seed(1)
    outputs = torch.randn(40, 2)
    labels = torch.randint(0, 2, (40,))
    metrics = task.metrics()
    task.update_metrics(metrics, outputs, {"target": labels})
    frame = pd.DataFrame(
        {"label": (1 - labels).numpy(), **spec.prediction_columns({"probs": outputs.softmax(-1).numpy()})}
    )
    flipped = spec.metric("auroc").fn(spec.metric_arrays(frame), None)[0]
    assert float(metrics.compute()["auroc"]) != pytest.approx(flipped, abs=1e-3)
