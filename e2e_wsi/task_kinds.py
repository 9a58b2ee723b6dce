"""The task vocabulary, stated once: what kind of label a cohort has and a model learns.

Three *task kinds* exist across the project, and every module that names one imports it from here:

* ``classification`` — one class per slide (subtyping, diagnosis); reported with AUROC, accuracy, F1;
* ``grading`` — an ordinal class per slide (e.g. ISUP 0-5); reported with accuracy and quadratic kappa;
* ``survival`` — a time and an event per case; reported with the concordance index.

The training side chooses a task *object* in YAML (``model.task``, a :class:`e2e_wsi.models.tasks.Task`
subclass whose ``kind`` is one of these); the data module, the manifest checks and the evaluation report
follow from that kind. Synthetic cohorts (``e2e-wsi synth --task``) are named after the clinical
scenario they simulate; :data:`COHORT_TASK_KINDS` says which task kind each one trains.
"""

from __future__ import annotations

from typing import Literal, get_args

TaskKind = Literal["classification", "grading", "survival"]
TASK_KINDS: tuple[TaskKind, ...] = get_args(TaskKind)

CohortKind = Literal["subtype", "grade", "survival", "diagnosis"]
# Synthetic cohort -> the task kind (and model.task class) that learns it.
COHORT_TASK_KINDS: dict[CohortKind, TaskKind] = {
    "subtype": "classification",  # ClassificationTask, K classes
    "grade": "grading",  # GradingTask, K grades
    "survival": "survival",  # DiscreteSurvivalTask or CoxSurvivalTask
    "diagnosis": "classification",  # ClassificationTask, 2 classes (lesion-free vs lesion)
}
COHORT_KINDS: tuple[CohortKind, ...] = get_args(CohortKind)


def check_task_kind(kind: str) -> TaskKind:
    """Return ``kind`` if it is a task kind, else raise a ``ValueError`` that lists them.

    Raises:
        ValueError: For anything but ``classification``, ``grading`` or ``survival``.
    """
    if kind not in TASK_KINDS:
        hint = (
            f" (the synthetic cohort {kind!r} trains as {COHORT_TASK_KINDS[kind]!r})"
            if kind in COHORT_TASK_KINDS
            else ""
        )
        raise ValueError(f"unknown task {kind!r}: use one of {list(TASK_KINDS)}{hint}")
    return kind  # type: ignore[return-value]


__all__ = ["COHORT_KINDS", "COHORT_TASK_KINDS", "TASK_KINDS", "CohortKind", "TaskKind", "check_task_kind"]
