"""Patient-level stratified splits, k-fold, save/reload."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from e2e_wsi.data.splits import apply_splits, case_folds, load_splits, make_splits, save_splits


def _cohort(num_cases: int = 100, seed: int = 0, survival: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(num_cases):
        label = int(c % 4 == 0)  # 25% positives: stratification matters
        for s in range(int(rng.integers(1, 4))):  # 1-3 slides per case
            row = {"case_id": f"case{c:03d}", "slide_id": f"c{c:03d}_s{s}"}
            row.update({"time": float(c + 1), "event": label} if survival else {"label": label})
            rows.append(row)
    return pd.DataFrame(rows)


def _no_case_on_two_sides(df: pd.DataFrame, split: pd.Series) -> bool:
    return bool((df.assign(split=split).groupby("case_id")["split"].nunique() == 1).all())


@pytest.mark.parametrize("ratios", [(0.7, 0.1, 0.2), (0.7, 0.0, 0.3), (0.5, 0.25, 0.25)])
def test_holdout_is_patient_level_and_follows_ratios(ratios: tuple[float, float, float]) -> None:
    df = _cohort()
    split = make_splits(df, ratios, seed=3)
    assert _no_case_on_two_sides(df, split)
    per_case = df.assign(split=split).drop_duplicates("case_id")["split"].value_counts()
    for name, r in zip(("train", "val", "test"), ratios, strict=True):
        assert abs(per_case.get(name, 0) - 100 * r) <= 1


def test_stratification_keeps_label_proportions() -> None:
    df = _cohort(200)
    split = make_splits(df, (0.7, 0.1, 0.2), seed=1)
    cases = df.assign(split=split).drop_duplicates("case_id")
    for name in ("train", "val", "test"):
        frac = cases.loc[cases["split"] == name, "label"].mean()
        assert abs(frac - 0.25) < 0.05, (name, frac)


def test_survival_stratifies_by_event() -> None:
    df = _cohort(120, survival=True)
    cases = df.assign(split=make_splits(df, (0.5, 0.0, 0.5), seed=2)).drop_duplicates("case_id")
    events = cases.groupby("split")["event"].sum()
    assert abs(events["train"] - events["test"]) <= 1


def test_seed_changes_split_and_is_reproducible() -> None:
    df = _cohort()
    a, b, c = make_splits(df, seed=0), make_splits(df, seed=0), make_splits(df, seed=1)
    assert a.equals(b) and not a.equals(c)


def test_manifest_split_column_wins() -> None:
    df = _cohort(10).assign(split="test")
    assert (make_splits(df, seed=0) == "test").all()


def test_kfold_test_folds_partition_the_cases() -> None:
    df = _cohort(53)
    tests = [
        set(df.loc[make_splits(df, (0.8, 0.2, 0.0), seed=4, fold=i, num_folds=5) == "test", "case_id"])
        for i in range(5)
    ]
    assert set().union(*tests) == set(df["case_id"])
    assert sum(len(t) for t in tests) == df["case_id"].nunique()  # disjoint
    folds = case_folds(df, 5, seed=4)
    assert tests[2] == {c for c, f in folds.items() if f == 2}
    split = make_splits(df, (0.8, 0.2, 0.0), seed=4, fold=0, num_folds=5)
    assert _no_case_on_two_sides(df, split)
    rest = df.assign(split=split).drop_duplicates("case_id").query("split != 'test'")["split"].value_counts()
    assert abs(rest["val"] / rest.sum() - 0.2) < 0.05


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_save_and_reload_is_identical(tmp_path, suffix: str) -> None:
    df = _cohort()
    split = make_splits(df, seed=5)
    path = save_splits(df, split, tmp_path / f"splits{suffix}")
    reloaded = apply_splits(df, load_splits(path))
    assert reloaded.tolist() == split.tolist()


def test_reload_rejects_missing_slides_and_bad_names(tmp_path) -> None:
    df = _cohort(10)
    path = save_splits(df.iloc[1:], make_splits(df.iloc[1:], seed=0), tmp_path / "s.csv")
    with pytest.raises(ValueError, match="have no split"):
        apply_splits(df, load_splits(path))
    (tmp_path / "bad.csv").write_text("slide_id,case_id,split\na,b,training\n")
    with pytest.raises(ValueError, match="training"):
        load_splits(tmp_path / "bad.csv")


@pytest.mark.parametrize("ratios", [(0.7, 0.2, 0.2), (0.0, 0.5, 0.5), (0.5, -0.1, 0.6)])
def test_bad_ratios(ratios: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="ratios"):
        make_splits(_cohort(10), ratios)
