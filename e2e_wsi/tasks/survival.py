"""Survival: a time and an event per case; a bag holds all slides of a case; predictions ``risk``.

Risk convention: higher ``risk`` means shorter expected survival (see :mod:`e2e_wsi.models.losses`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from e2e_wsi.tasks import _checks as C
from e2e_wsi.tasks import metrics as M
from e2e_wsi.tasks import register_task_spec
from e2e_wsi.tasks.base import Arrays, BagUnit, MetricDef, SynthCohort, TaskSpec

if TYPE_CHECKING:  # torch is imported by the methods that need it: `e2e-wsi synth` workers do not
    import torch


def _c_index(a: Arrays, w: np.ndarray | None) -> np.ndarray:
    return M.c_index(a["time"], a["event"], a["risk"], w)


def weibull_outcomes(rng: np.random.Generator, risk: np.ndarray, burden: np.ndarray) -> dict[str, list[str]]:
    """Synthetic ``time``/``event``: Weibull event times whose hazard grows with the case's score,
    with independent censoring (dropout, end of study at 120 months).

    Returns:
        ``time`` (months > 0, two decimals) and ``event`` (1 = observed, 0 = censored), per case.
    """
    scale = 60.0 * np.exp(-2.0 * risk)  # proportional hazards: log-hazard linear in the score
    event_time = scale * rng.weibull(1.5, risk.size)
    censor_time = np.minimum(rng.exponential(90.0, risk.size), 120.0)
    time = np.maximum(np.round(np.minimum(event_time, censor_time), 2), 0.01)
    event = (event_time <= censor_time).astype(np.int64)
    return {"time": [f"{t:.2f}" for t in time], "event": [str(int(e)) for e in event]}


@register_task_spec
class SurvivalSpec(TaskSpec):
    """A time and an event per case; one bag (and one predictions row) per case."""

    kind = "survival"
    description = "a time and an event per case (all its slides form one bag); concordance index"
    id_columns = ("case_id",)
    unit_column = "case_id"
    manifest_columns = ("time", "event")
    truth_columns = ("time", "event")
    prediction_keys = ("risk",)
    main_prediction_column = "risk"
    # The paper reports the C-index for survival.
    main_metric = "c_index"
    metrics = (MetricDef("c_index", _c_index),)
    default_num_targets = 4  # discrete time bins
    synth_cohorts = (SynthCohort("survival", weibull_outcomes),)

    # ---------------------------------------------------------------------------------- manifest
    def parse_manifest(
        self,
        df: pd.DataFrame,
        errors: list[str],
        num_targets: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        """``time`` > 0 and ``event`` in {0, 1}; the slides of one case must agree on both."""
        times: list[float | None] = []
        events: list[int | None] = []
        for _, row in df.iterrows():
            time = C.parse_float(row["time"])
            if time is None or time <= 0:
                errors.append(f"{C.where(row)}: time {row['time']!r} must be a positive number")
                time = None
            event = C.parse_int(row["event"])
            if event not in (0, 1):
                errors.append(f"{C.where(row)}: event {row['event']!r} must be 0 (censored) or 1 (event)")
                event = None
            times.append(time)
            events.append(event)
        df["time"] = pd.array(times, dtype="Float64")
        df["event"] = pd.array(events, dtype="Int64")
        # A case is one bag in survival, so its slides must agree on the outcome.
        for case_id, group in df.dropna(subset=["time", "event"]).groupby("case_id", sort=False):
            if group["time"].nunique() > 1 or group["event"].nunique() > 1:
                lines = ", ".join(str(v) for v in group["line"])
                errors.append(
                    f"lines {lines} (case_id {case_id!r}): slides of one case disagree on time/event"
                )

    def finish_manifest(self, df: pd.DataFrame) -> None:
        df["time"] = df["time"].astype("float64")
        df["event"] = df["event"].astype("int64")

    # -------------------------------------------------------------------------------------- bags
    def bag_units(self, df: pd.DataFrame) -> list[BagUnit]:
        """One bag per case holding its slides; targets ``time`` and ``event`` (floats)."""
        bags = []
        for case_id, g in df.groupby("case_id", sort=False):
            targets = {"time": float(g["time"].iloc[0]), "event": float(g["event"].iloc[0])}
            bags.append((str(case_id), tuple(map(str, g["slide_id"])), targets))
        return bags

    def fit_targets(self, train: list[BagUnit], num_targets: int | None) -> dict[str, Any]:
        """``bin_edges``: quantiles of the uncensored training times (all times if none is
        uncensored) into ``num_targets`` bins; outer edges 0 and inf."""
        k = num_targets or self.default_num_targets or 1
        times = np.array([t["time"] for _, _, t in train if t["event"] == 1])
        if len(times) == 0:
            times = np.array([t["time"] for _, _, t in train])
        inner = np.quantile(times, np.linspace(0, 1, k + 1)[1:-1]) if len(times) else []
        return {"bin_edges": [0.0, *map(float, inner), math.inf]}

    def finish_targets(self, targets: dict[str, float | int], state: Mapping[str, Any]) -> dict:
        """Adds ``target``: the discrete time bin of ``time``."""
        edges = state["bin_edges"]
        return {**targets, "target": int(np.searchsorted(edges[1:-1], targets["time"], side="right"))}

    def truth_row(self, targets: Mapping[str, float | int]) -> dict[str, float | int]:
        return {"time": targets["time"], "event": int(targets["event"])}

    def train_targets(self, targets: list[Mapping[str, float | int]]) -> torch.Tensor:
        """float32 [n, 2]: (time, event) of each training case."""
        import torch

        return torch.tensor([[t["time"], t["event"]] for t in targets], dtype=torch.float32)

    def batch_truth(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"time": batch["time"], "event": batch["event"]}

    # ------------------------------------------------------------------------------- predictions
    def prediction_columns(self, preds: Mapping[str, np.ndarray]) -> dict[str, list]:
        if "risk" not in preds:
            raise ValueError(f"survival predictions need 'risk' (got {sorted(preds)})")
        return {"risk": np.asarray(preds["risk"], dtype=np.float64).reshape(-1).tolist()}

    def validate_predictions(self, df: pd.DataFrame, source: str) -> pd.DataFrame:
        """``case_id,time,event,risk``: time >= 0, event in {0, 1}, one row per case."""
        out = self._frame(df, ["time", "event", "risk"], source)
        out["time"] = C.as_numbers(out, "time", source, integer=False)
        if (out["time"] < 0).any():
            raise ValueError(f"{source}: negative time at line {C.line_of(out, out['time'] < 0)}")
        event = C.as_numbers(out, "event", source, integer=True)
        bad = (event != 0) & (event != 1)
        if bad.any():
            raise ValueError(
                f"{source}: event at line {C.line_of(out, bad)} is {event[bad][0]:g}; use 1 = event, 0 = censored"
            )
        out["event"] = event.astype(np.int64)
        out["risk"] = C.as_numbers(out, "risk", source, integer=False)
        return out.reset_index(drop=True)

    def recognises(self, columns: set[str]) -> bool:
        return {"time", "event", "risk"} <= columns

    def metric_arrays(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        return {
            "time": df["time"].to_numpy(np.float64),
            "event": df["event"].to_numpy(np.float64),
            "risk": df["risk"].to_numpy(np.float64),
        }

    # ---------------------------------------------------------------------------------- caption
    def caption(self, prediction: Mapping[str, np.ndarray], class_names: Sequence[str] | None = None) -> str:
        risk = float(np.asarray(prediction["risk"], dtype=np.float64).reshape(-1)[0])
        return f"predicted risk: {risk:.3g}"
