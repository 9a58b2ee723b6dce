"""Case-level bootstrap reports and paired comparisons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index

from e2e_wsi.evaluation.bootstrap import (
    bootstrap_report,
    bootstrap_values,
    draw_cases,
    metric_functions,
    paired_comparison,
    resample_weights,
)
from e2e_wsi.evaluation.report import validate_predictions

METRIC_KEYS = {"point", "mean", "std", "ci_low", "ci_high", "n_valid"}


def classification_frame(
    n_cases: int, k: int = 2, seed: int = 0, skill: float = 1.5, slides: int = 1
) -> pd.DataFrame:
    """``slides`` slides per case with the case's label; probabilities from noisy logits."""
    rng = np.random.default_rng(seed)
    case_labels = rng.integers(0, k, n_cases)
    rows = []
    for c, y in enumerate(case_labels):
        for s in range(slides):
            logits = rng.normal(size=k) + skill * np.eye(k)[y]
            p = np.exp(logits) / np.exp(logits).sum()
            rows.append(
                {
                    "case_id": f"case-{c}",
                    "slide_id": f"case-{c}_s{s}",
                    "label": int(y),
                    "pred": int(p.argmax()),
                    **{f"prob_{j}": float(p[j]) for j in range(k)},
                }
            )
    return pd.DataFrame(rows)


def survival_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = np.round(rng.exponential(np.exp(-risk) * 10) + 0.1, 1)
    return pd.DataFrame(
        {
            "case_id": [f"p{i}" for i in range(n)],
            "time": time,
            "event": rng.integers(0, 2, n),
            "risk": risk + rng.normal(scale=0.5, size=n),
        }
    )


@pytest.mark.parametrize(
    ("task", "names"),
    [
        ("classification", ["auroc", "accuracy", "balanced_accuracy", "f1_macro"]),
        ("grading", ["balanced_accuracy", "accuracy", "kappa", "qwk"]),
        ("survival", ["c_index"]),
    ],
)
def test_report_layout_and_ci_covers_point(task: str, names: list[str]) -> None:
    df = (
        survival_frame(200)
        if task == "survival"
        else classification_frame(200, k=4 if task == "grading" else 2)
    )
    report = bootstrap_report(df, task, n_resamples=300, seed=1)
    assert report["task"] == task and report["n"] == 200 and report["n_cases"] == 200
    assert report["bootstrap"] == {"n_resamples": 300, "seed": 1, "ci": 0.95, "unit": "case"}
    assert list(report["metrics"]) == names
    for name, m in report["metrics"].items():
        assert set(m) == METRIC_KEYS, name
        assert m["n_valid"] == 300
        assert m["ci_low"] <= m["point"] <= m["ci_high"], name
        assert m["ci_low"] < m["ci_high"] and 0 < m["std"] < 0.2, name
        assert abs(m["mean"] - m["point"]) < 2 * m["std"], name


def test_point_estimate_is_the_metric_on_all_data() -> None:
    df = survival_frame(80, seed=3)
    report = bootstrap_report(df, "survival", n_resamples=20)
    ref = concordance_index(df["time"], -df["risk"], df["event"])
    assert report["metrics"]["c_index"]["point"] == pytest.approx(ref, abs=1e-12)


def test_seeded_runs_identical_and_seeds_differ() -> None:
    df = classification_frame(60, seed=2)
    a = bootstrap_report(df, "classification", n_resamples=100, seed=7)
    b = bootstrap_report(df, "classification", n_resamples=100, seed=7)
    c = bootstrap_report(df, "classification", n_resamples=100, seed=8)
    assert a == b
    assert a["metrics"]["auroc"]["mean"] != c["metrics"]["auroc"]["mean"]
    assert a["metrics"]["auroc"]["point"] == c["metrics"]["auroc"]["point"]


def test_resample_values_equal_metric_on_explicitly_resampled_cases() -> None:
    """Each resample scores the rows of its drawn cases, duplicates included."""
    df = validate_predictions(classification_frame(25, k=3, seed=4, slides=2), "classification")
    values = bootstrap_values(df, metric_functions("classification"), n_resamples=6, seed=11)
    cases = df["case_id"].unique()
    draws = draw_cases(len(cases), 6, 11)
    for r in range(6):
        resample = pd.concat([df[df["case_id"] == cases[i]] for i in draws[r]], ignore_index=True)
        for name, fn in metric_functions("classification").items():
            expected = fn(resample, np.ones((1, len(resample))))[0]
            assert values[name][r] == pytest.approx(expected, abs=1e-12), (name, r)


def test_slides_of_a_case_move_together() -> None:
    case_ids = ["a", "a", "b", "c", "c", "c", "d"]
    weights = resample_weights(case_ids, n_resamples=200, seed=0)
    assert weights.shape == (200, 7)
    np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
    np.testing.assert_array_equal(weights[:, 3], weights[:, 5])
    # Each resample draws exactly n_cases = 4 cases.
    np.testing.assert_array_equal(weights[:, [0, 2, 3, 6]].sum(axis=1), 4)
    assert (weights[:, 0] != weights[:, 2]).any()


def test_duplicating_every_case_slide_leaves_the_bootstrap_unchanged() -> None:
    """With case-level resampling, two identical slides per case change nothing (slide-level would)."""
    one = classification_frame(40, seed=5)
    two = pd.concat([one, one.assign(slide_id=one["slide_id"] + "-copy")], ignore_index=True)
    r1 = bootstrap_report(one, "classification", n_resamples=200, seed=3)
    r2 = bootstrap_report(two, "classification", n_resamples=200, seed=3)
    assert r2["n"] == 80 and r2["n_cases"] == 40
    for name in r1["metrics"]:
        for key in ("point", "mean", "std", "ci_low", "ci_high"):
            assert r2["metrics"][name][key] == pytest.approx(r1["metrics"][name][key], abs=1e-12), (name, key)


def test_undefined_resamples_are_skipped_and_counted() -> None:
    df = classification_frame(10, seed=0)
    df["label"] = 0
    df.loc[3, "label"] = 1  # a single positive case: resamples without it have no AUROC
    report = bootstrap_report(df, "classification", n_resamples=400, seed=5)
    has_positive = resample_weights(df["case_id"], 400, 5)[:, 3] > 0
    auroc = report["metrics"]["auroc"]
    assert 0 < auroc["n_valid"] < 400
    assert auroc["n_valid"] == int(has_positive.sum())
    assert report["metrics"]["accuracy"]["n_valid"] == 400
    assert np.isfinite(auroc["mean"])


def test_all_resamples_undefined_gives_nan_statistics() -> None:
    df = survival_frame(5).assign(event=0)
    m = bootstrap_report(df, "survival", n_resamples=10)["metrics"]["c_index"]
    assert m["n_valid"] == 0 and all(np.isnan(m[k]) for k in ("point", "mean", "std", "ci_low", "ci_high"))


def test_bad_arguments() -> None:
    df = classification_frame(10)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_report(df, "classification", n_resamples=0)
    with pytest.raises(ValueError, match="ci"):
        bootstrap_report(df, "classification", ci=1.5)
    with pytest.raises(ValueError, match="unknown task"):
        bootstrap_report(df, "segmentation")  # type: ignore[arg-type]


def test_paired_comparison_of_a_run_with_itself_is_zero() -> None:
    df = classification_frame(50, seed=6)
    shuffled = df.sample(frac=1.0, random_state=0)  # row order must not matter
    cmp = paired_comparison(df, shuffled, "classification", n_resamples=200)
    d = cmp["difference"]
    assert cmp["metric"] == "auroc" and d["definition"] == "a - b"
    assert d["point"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0
    assert d["share_le_0"] == 1.0 and d["p_value"] == 1.0


def test_paired_comparison_detects_a_better_run() -> None:
    good = classification_frame(150, seed=7, skill=3.0)
    rng = np.random.default_rng(0)
    p1 = rng.random(150)
    weak = good.assign(prob_1=p1, prob_0=1 - p1, pred=(p1 > 0.5).astype(int))
    cmp = paired_comparison(good, weak, "classification", n_resamples=300, seed=2)
    d = cmp["difference"]
    assert d["point"] == pytest.approx(cmp["a"]["point"] - cmp["b"]["point"])
    assert d["ci_low"] > 0 and d["share_le_0"] < 0.01 and d["p_value"] < 0.02
    # Paired: the difference's spread is that of the per-resample differences of the two runs.
    fns = {"auroc": metric_functions("classification")["auroc"]}
    va, vb = (
        bootstrap_values(validate_predictions(f, "classification"), fns, 300, 2)["auroc"]
        for f in (good, weak)
    )
    assert d["std"] == pytest.approx(np.std(va - vb, ddof=1))


def test_paired_comparison_uses_balanced_accuracy_for_grading_and_c_index_for_survival() -> None:
    grading = classification_frame(40, k=4, seed=1)  # official PANDA "Acc": macro-averaged accuracy
    assert paired_comparison(grading, grading, "grading", n_resamples=10)["metric"] == "balanced_accuracy"
    surv = survival_frame(40)
    reversed_risk = paired_comparison(surv, surv.assign(risk=-surv["risk"]), "survival", n_resamples=50)
    assert reversed_risk["metric"] == "c_index" and reversed_risk["difference"]["point"] > 0


def test_paired_comparison_rejects_different_units_or_truth() -> None:
    df = classification_frame(20, seed=1)
    with pytest.raises(ValueError, match="different slide_ids"):
        paired_comparison(df, df.iloc[:-1], "classification", n_resamples=10)
    flipped = df.copy()
    flipped.loc[0, "label"] = 1 - flipped.loc[0, "label"]
    with pytest.raises(ValueError, match="disagree on label"):
        paired_comparison(df, flipped, "classification", n_resamples=10)
    surv = survival_frame(10)
    with pytest.raises(ValueError, match="disagree on time"):
        paired_comparison(surv, surv.assign(time=surv["time"] + 1), "survival", n_resamples=10)
