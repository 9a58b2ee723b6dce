"""Checks shared by the task specs: manifest cells and ``predictions.csv`` columns.

Manifest messages name the CSV line (``row["line"]``, the header is line 1) and the slide id;
predictions messages name the file and the line of the first bad row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from e2e_wsi.utils import validate_slide_id


# ------------------------------------------------------------------------------------ manifest cells
def parse_int(value: object) -> int | None:
    """Parse an integer written as ``1`` or ``1.0``; ``None`` when it is not one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def parse_float(value: object) -> float | None:
    """Parse a finite number; ``None`` for anything else (empty, text, NaN, inf)."""
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def where(row: pd.Series) -> str:
    """``line N (slide_id 'x')``: where a manifest row is, for messages."""
    return f"line {row['line']} (slide_id {row.get('slide_id')!r})"


# ------------------------------------------------------------------------------ predictions columns
def line_of(df: pd.DataFrame, mask: np.ndarray | pd.Series) -> int:
    """1-based CSV line of the first flagged row (line 1 is the header)."""
    return int(np.flatnonzero(np.asarray(mask))[0]) + 2


def require(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    """Raise naming the missing columns, or the first empty cell of a required column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(map(str, df.columns))}")
    for col in columns:
        bad = df[col].isna().to_numpy()
        if bad.any():
            raise ValueError(f"{source}: empty or NaN value in column {col!r} at line {line_of(df, bad)}")


def as_numbers(df: pd.DataFrame, col: str, source: str, integer: bool) -> np.ndarray:
    """Column ``col`` as float64, every value finite (and integral when ``integer``), else raise."""
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if bad.any():
        kind = "an integer" if integer else "a finite number"
        line = line_of(df, bad)
        raise ValueError(
            f"{source}: column {col!r} at line {line} is {df[col].iloc[line - 2]!r}, expected {kind}"
        )
    return values


def check_ids(df: pd.DataFrame, col: str, source: str) -> None:
    """Every value of ``col`` is a usable id (no path separators, control characters, ...)."""
    for i, value in enumerate(df[col]):
        try:
            validate_slide_id(value)
        except ValueError as err:
            raise ValueError(f"{source}: column {col!r} at line {i + 2}: {err}") from None


def check_unique(df: pd.DataFrame, col: str, source: str) -> None:
    """One row per unit: raise naming the first repeated value of ``col``."""
    dup = df[col].duplicated().to_numpy()
    if dup.any():
        line = line_of(df, dup)
        raise ValueError(
            f"{source}: {col} {df[col].iloc[line - 2]!r} appears twice (line {line}); one row per unit"
        )
