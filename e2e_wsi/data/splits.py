"""Patient-level, stratified, seeded train/val/test splits (hold-out or k-fold), saved and reloaded.

All slides of a case land on one side. Cases are stratified by label (by event for survival): the
strata are shuffled and laid end to end, and split names are dealt along that list with a
largest-remainder (Bresenham) rule, so the overall counts match the ratios as closely as integers allow
and each stratum gets its share to within one case.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from e2e_wsi.data.manifest import SPLITS


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (3,) or (r < 0).any() or not np.isclose(r.sum(), 1.0, atol=1e-6) or r[0] <= 0:
        raise ValueError(
            f"split ratios {list(ratios)} must be three non-negative numbers (train, val, test) summing to 1 "
            "with train > 0, e.g. [0.7, 0.1, 0.2] or [0.7, 0.0, 0.3]"
        )
    return r / r.sum()


def _case_table(df: pd.DataFrame, stratify: bool) -> pd.DataFrame:
    """One row per case with its stratum (mode of the label, or any event, within the case)."""
    key = "event" if "event" in df.columns else "label"
    if not stratify or key not in df.columns:
        return pd.DataFrame({"case_id": df["case_id"].unique(), "stratum": 0})
    strata = df.groupby("case_id", sort=False)[key].agg(lambda s: s.mode().iloc[0])
    return pd.DataFrame({"case_id": strata.index, "stratum": strata.to_numpy()})


def _ordered_cases(cases: pd.DataFrame, rng: np.random.Generator) -> list[str]:
    """Cases shuffled within their stratum, strata in a random order, laid end to end."""
    groups = [list(g["case_id"]) for _, g in cases.groupby("stratum", sort=True)]
    order: list[str] = []
    for g in rng.permutation(len(groups)):
        members = groups[g]
        order += [members[i] for i in rng.permutation(len(members))]
    return order


def _deal(n: int, ratios: np.ndarray) -> np.ndarray:
    """Assign positions 0..n-1 to groups so that every prefix tracks ``ratios`` (largest remainder)."""
    counts = np.zeros(len(ratios))
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        j = int(np.argmax((i + 1) * ratios - counts))
        out[i] = j
        counts[j] += 1
    return out


def make_splits(
    df: pd.DataFrame,
    ratios: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    stratify: bool = True,
    fold: int | None = None,
    num_folds: int | None = None,
) -> pd.Series:
    """Split the slides of a manifest by case.

    A ``split`` column in ``df`` (the user's own split) wins and is returned unchanged.

    Args:
        df: Output of :func:`~e2e_wsi.data.manifest.load_manifest` (needs ``case_id``, and ``label`` or
            ``event`` for stratification).
        ratios: (train, val, test) fractions of the cases; val may be 0.
        seed: Seed of the shuffle; the same seed gives the same split.
        stratify: Stratify by label (survival: by event).
        fold: With ``num_folds``: which fold (0-based) is the test set. The other folds are split into
            train and val with the proportion ``ratios[0] : ratios[1]`` (``ratios[2]`` is ignored).
        num_folds: Number of folds k >= 2 for cross-validation; ``None`` for a hold-out split.

    Returns:
        ``train``/``val``/``test`` per row of ``df`` (same index), named ``split``.
    """
    if "split" in df.columns:
        return df["split"].rename("split")
    r = _check_ratios(ratios)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    order = _ordered_cases(_case_table(df, stratify), rng)
    if (fold is None) != (num_folds is None):
        raise ValueError("give both fold and num_folds for cross-validation, or neither")
    if num_folds is None:
        side = dict(zip(order, np.asarray(SPLITS)[_deal(len(order), r)], strict=True))
    else:
        if num_folds < 2 or not 0 <= fold < num_folds:  # type: ignore[operator]
            raise ValueError(
                f"fold {fold} of num_folds {num_folds}: need num_folds >= 2 and 0 <= fold < num_folds"
            )
        if num_folds > len(order):
            raise ValueError(f"num_folds {num_folds} is larger than the number of cases ({len(order)})")
        folds = np.arange(len(order)) % num_folds
        rest = [c for c, f in zip(order, folds, strict=True) if f != fold]
        inner = np.array([r[0], r[1]]) / (r[0] + r[1])
        side = {c: "test" for c, f in zip(order, folds, strict=True) if f == fold}
        side.update(zip(rest, np.asarray(SPLITS[:2])[_deal(len(rest), inner)], strict=True))
    return df["case_id"].map(side).rename("split")


def case_folds(df: pd.DataFrame, num_folds: int, seed: int = 0, stratify: bool = True) -> dict[str, int]:
    """The fold of every case used by :func:`make_splits` (``fold`` = test fold) for the same seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    order = _ordered_cases(_case_table(df, stratify), rng)
    return {c: i % num_folds for i, c in enumerate(order)}


def save_splits(df: pd.DataFrame, splits: pd.Series, path: str | Path) -> Path:
    """Write ``slide_id,case_id,split`` as CSV, or as a JSON list of records if ``path`` ends in ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {
            "slide_id": df["slide_id"].to_numpy(),
            "case_id": df["case_id"].to_numpy(),
            "split": splits.to_numpy(),
        }
    )
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(table.to_dict(orient="records"), indent=1))
    else:
        table.to_csv(path, index=False)
    return path


def load_splits(path: str | Path) -> pd.DataFrame:
    """Read a file written by :func:`save_splits` (CSV or JSON).

    Returns:
        Columns ``slide_id``, ``case_id``, ``split`` (str).

    Raises:
        ValueError: Missing columns, a split name other than train/val/test, or a duplicate slide id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} does not exist (it is written as splits.csv in a run folder)"
        )
    if path.suffix.lower() == ".json":
        table = pd.DataFrame(json.loads(path.read_text()))
    else:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"slide_id", "case_id", "split"} - set(table.columns)
    if missing:
        raise ValueError(f"split file {path}: missing column(s) {sorted(missing)}")
    table = table[["slide_id", "case_id", "split"]].astype(str)
    bad = table[~table["split"].isin(SPLITS)]
    if not bad.empty:
        rows = ", ".join(f"{s!r} ({v!r})" for s, v in zip(bad["slide_id"], bad["split"], strict=True))
        raise ValueError(f"split file {path}: split must be one of {list(SPLITS)}; bad rows: {rows}")
    dup = table["slide_id"][table["slide_id"].duplicated()]
    if not dup.empty:
        raise ValueError(f"split file {path}: duplicate slide ids {sorted(set(dup))}")
    return table


def apply_splits(df: pd.DataFrame, table: pd.DataFrame, source: str = "split file") -> pd.Series:
    """Map a loaded split table onto a manifest; every manifest slide must be in it with the same case.

    Raises:
        ValueError: Naming the slides that are missing from the table or whose case differs.
    """
    by_slide = table.set_index("slide_id")
    missing = sorted(set(df["slide_id"]) - set(by_slide.index))
    if missing:
        raise ValueError(f"{source}: {len(missing)} manifest slide(s) have no split: {missing[:20]}")
    cases = by_slide.loc[df["slide_id"], "case_id"].to_numpy()
    moved = df["slide_id"][cases != df["case_id"].to_numpy()]
    if not moved.empty:
        raise ValueError(f"{source}: case_id differs from the manifest for slides {list(moved)[:20]}")
    return pd.Series(by_slide.loc[df["slide_id"], "split"].to_numpy(), index=df.index, name="split")
