"""Task kinds as plug-ins: one :class:`~e2e_wsi.tasks.base.TaskSpec` per kind, looked up by name.

Built-in kinds (one module each in this package, registered with :func:`register_task_spec`):

* ``classification`` — one class per slide (subtyping, diagnosis); AUROC, accuracy, F1;
* ``grading`` — an ordinal class per slide (e.g. ISUP 0-5); accuracy, quadratic kappa;
* ``survival`` — a time and an event per case; the concordance index;
* ``regression`` — a continuous target per slide (a biomarker score); Pearson r, Spearman rho, MAE, R^2.

The torch side of a task (head, loss, what ``forward`` outputs mean) is a
:class:`e2e_wsi.models.tasks.Task` chosen in YAML; its ``kind`` names the spec. Every module of this
package is imported on the first lookup, so a new kind is one new module here (plus its ``Task``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

from e2e_wsi.errors import UserError

if TYPE_CHECKING:
    from e2e_wsi.tasks.base import SynthCohort, TaskSpec

TaskKind = str  # a registered kind; TASK_KINDS() lists them
_SPECS: dict[str, TaskSpec] = {}
_LOADED = False
S = TypeVar("S", bound="type[TaskSpec]")


def register_task_spec(cls: S) -> S:
    """Class decorator: register one instance of a :class:`TaskSpec` subclass under its ``kind``.

    Raises:
        ValueError: If another spec already holds the kind.
    """
    kind = cls.kind
    if kind in _SPECS and type(_SPECS[kind]) is not cls:
        raise ValueError(
            f"task kind {kind!r} is registered twice ({type(_SPECS[kind]).__name__}, {cls.__name__})"
        )
    _SPECS[kind] = cls()
    return cls


def _load() -> None:
    """Import every module of this package once, so their ``@register_task_spec`` run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def task_specs() -> dict[str, TaskSpec]:
    """Every registered spec by kind, in registration order."""
    _load()
    return dict(_SPECS)


def task_kinds() -> tuple[str, ...]:
    """The registered task kinds."""
    return tuple(task_specs())


def get_task_spec(kind: str) -> TaskSpec:
    """The spec of ``kind``.

    Raises:
        UserError: For an unknown kind, listing the known ones (and, for a synthetic cohort's name,
            the kind it trains as).
    """
    specs = task_specs()
    if kind in specs:
        return specs[kind]
    cohorts = cohort_task_kinds()
    hint = f" (the synthetic cohort {kind!r} trains as {cohorts[kind]!r})" if kind in cohorts else ""
    raise UserError(f"unknown task {kind!r}: use one of {list(specs)}{hint}")


def spec_of_predictions(keys: object) -> TaskSpec:
    """The first spec whose ``prediction_keys`` all appear in ``keys`` (a ``Task.predict`` output).

    Raises:
        ValueError: If no spec's keys are there.
    """
    have = set(keys)  # type: ignore[call-overload]
    for spec in task_specs().values():
        if set(spec.prediction_keys) <= have:
            return spec
    raise ValueError(f"predictions hold none of the tasks' prediction keys (got {sorted(have)})")


def check_task_kind(kind: str) -> str:
    """Return ``kind`` if it is registered, else raise :class:`UserError` listing the kinds."""
    get_task_spec(kind)
    return kind


def synth_cohorts() -> dict[str, tuple[TaskSpec, SynthCohort]]:
    """Synthetic cohort name -> (the spec it trains as, the cohort)."""
    return {c.name: (spec, c) for spec in task_specs().values() for c in spec.synth_cohorts}


def cohort_task_kinds() -> dict[str, str]:
    """Synthetic cohort name -> the task kind that trains it."""
    return {name: spec.kind for name, (spec, _) in synth_cohorts().items()}


def __getattr__(name: str) -> object:
    # Constants of the former ``e2e_wsi.task_kinds``, computed from the registry on access.
    if name == "TASK_KINDS":
        return task_kinds()
    if name == "COHORT_KINDS":
        return tuple(synth_cohorts())
    if name == "COHORT_TASK_KINDS":
        return cohort_task_kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TaskKind",
    "check_task_kind",
    "cohort_task_kinds",
    "get_task_spec",
    "register_task_spec",
    "spec_of_predictions",
    "synth_cohorts",
    "task_kinds",
    "task_specs",
]
