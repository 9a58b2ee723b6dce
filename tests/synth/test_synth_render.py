"""render_slide: H&E-like pixels and a ground truth whose lesions carry the label."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_wsi.synth.cohort import render_slide

SIZE = (2048, 2048)


def _stats(image: np.ndarray, truth: np.ndarray, value: int) -> np.ndarray:
    """Mean RGB of the level-0 pixels under the mask cells equal to ``value``."""
    cells = np.repeat(np.repeat(truth == value, 16, 0), 16, 1)
    return image[cells].astype(np.float64).mean(0)


def test_shapes_values_and_lesion_fraction() -> None:
    image, truth = render_slide(np.random.default_rng(0), SIZE, "subtype", 0, 0.05)
    assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
    assert truth.shape == (SIZE[0] // 16, SIZE[1] // 16) and truth.dtype == np.uint8
    assert set(np.unique(truth)) == {0, 128, 255}
    tissue = (truth > 0).mean()
    assert 0.1 < tissue < 0.8
    assert (truth == 255).sum() / (truth > 0).sum() == pytest.approx(0.05, abs=0.01)


def test_colours_background_stroma_lesion() -> None:
    image, truth = render_slide(np.random.default_rng(1), SIZE, "subtype", 0, 0.1)
    background, stroma, lesion = (_stats(image, truth, v) for v in (0, 128, 255))
    assert background.min() > 235  # white glass
    assert stroma[0] > stroma[1] + 30 and stroma[2] > stroma[1] + 10  # pink: R, B above G
    assert lesion.mean() < stroma.mean() - 5  # nuclei and epithelium make lesions darker
    assert lesion[2] - lesion[0] > stroma[2] - stroma[0]  # ... and more purple (blue vs red)


@pytest.mark.parametrize(("task", "label"), [("grade", 0), ("diagnosis", 0)])
def test_negative_slides_have_no_lesion(task: str, label: int) -> None:
    _, truth = render_slide(np.random.default_rng(2), SIZE, task, label, 0.2)
    assert (truth == 255).sum() == 0 and (truth == 128).sum() > 0


def test_burden_grows_with_grade_and_risk() -> None:
    def frac(task: str, label: float) -> float:
        _, truth = render_slide(np.random.default_rng(4), SIZE, task, label, 0.1, num_grades=6)
        return (truth == 255).sum() / (truth > 0).sum()

    assert frac("grade", 1) < frac("grade", 3) < frac("grade", 5)
    assert frac("survival", 0.0) < frac("survival", 0.5) < frac("survival", 1.0)


def test_subtype_is_morphology_not_global_colour() -> None:
    """Classes 0 and 1 differ inside lesions (lumens, nuclear shape) but not in stroma colour."""
    img0, t0 = render_slide(np.random.default_rng(5), SIZE, "subtype", 0, 0.1)
    img1, t1 = render_slide(np.random.default_rng(5), SIZE, "subtype", 1, 0.1)
    assert np.array_equal(t0, t1)  # same geometry for the same seed: only the lesion content differs
    stroma0, stroma1 = _stats(img0, t0, 128), _stats(img1, t1, 128)
    assert np.abs(stroma0 - stroma1).max() < 8
    cells = np.repeat(np.repeat(t0 == 255, 16, 0), 16, 1)
    bright0 = (img0[cells].min(1) > 240).mean()  # gland lumens are near-white
    bright1 = (img1[cells].min(1) > 240).mean()
    assert bright0 > 0.02 and bright0 > 3 * bright1


def test_same_rng_same_pixels_and_pen_marks() -> None:
    a, ta = render_slide(np.random.default_rng(7), (1024, 1024), "diagnosis", 1, 0.05)
    b, tb = render_slide(np.random.default_rng(7), (1024, 1024), "diagnosis", 1, 0.05)
    c, _ = render_slide(np.random.default_rng(8), (1024, 1024), "diagnosis", 1, 0.05)
    assert np.array_equal(a, b) and np.array_equal(ta, tb)
    assert not np.array_equal(a, c)
    pen, _ = render_slide(np.random.default_rng(7), (1024, 1024), "diagnosis", 1, 0.05, pen_marks=True)

    # a marker stroke adds saturated green/blue/black pixels that H&E never has (G not the lowest)
    def dark_or_green(image: np.ndarray) -> float:
        px = image.reshape(-1, 3).astype(int)
        return float(
            (
                (px.max(1) < 60)
                | ((px[:, 1] > px[:, 0]) & (px[:, 1] > 60))
                | ((px[:, 2] > px[:, 0] + 60) & (px[:, 1] < 90))
            ).mean()
        )

    assert dark_or_green(pen) > dark_or_green(a) + 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (1000, 1024)}, "multiple of 16"),
        ({"task": "segmentation"}, "unknown task"),
        ({"lesion_fraction": 1.5}, r"\[0, 1\]"),
        ({"lesion_fraction": -0.1}, r"\[0, 1\]"),
        ({"scale": 3}, "scale"),
        ({"label": 2}, "integer in 0..1"),
        ({"task": "grade", "label": 6}, "integer in 0..5"),
        ({"task": "survival", "label": 1.5}, "risk"),
    ],
)
def test_bad_parameters(kwargs: dict, message: str) -> None:
    args = {"size": (1024, 1024), "task": "subtype", "label": 0, "lesion_fraction": 0.05} | kwargs
    with pytest.raises(ValueError, match=message):
        render_slide(np.random.default_rng(0), **args)
