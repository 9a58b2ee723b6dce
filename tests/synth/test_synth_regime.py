"""Many-patch regime options of the synthetic cohorts: lesion foci and label-independent distractors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from e2e_wsi.cli import main as cli_main
from e2e_wsi.synth.cli import main as synth_main
from e2e_wsi.synth.cohort import render_slide, synthesize_cohort
from e2e_wsi.synth.render import DISTRACTOR

SIZE = (2048, 2048)


def _render(seed: int = 0, label: int = 0, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    return render_slide(np.random.default_rng(seed), SIZE, "subtype", label, 0.04, **kwargs)


def test_foci_split_the_lesion_area_into_that_many_blobs() -> None:
    _, one = _render()
    _, many = _render(lesion_foci=8)
    lesion = many == 255
    assert lesion.sum() / (many > 0).sum() == pytest.approx(0.04, abs=0.01)  # same burden as without foci
    assert ndimage.label(lesion)[1] >= 5  # small blobs may touch, most stay apart
    assert ndimage.label(lesion)[1] > ndimage.label(one == 255)[1]


def test_distractors_leave_tissue_and_lesions_as_they_were() -> None:
    image0, plain = _render(seed=3, lesion_foci=4)
    image1, with_d = _render(seed=3, lesion_foci=4, distractor_fraction=0.05)
    # The distractor stream is spawned after every other one: lesions and tissue do not move.
    assert np.array_equal(with_d == 255, plain == 255)
    assert np.array_equal(with_d > 0, plain > 0)
    distractor = with_d == DISTRACTOR
    assert distractor.sum() / (with_d > 0).sum() == pytest.approx(0.05, abs=0.015)
    assert not (distractor & (plain == 255)).any()
    assert set(np.unique(plain)) == {0, 128, 255}  # no distractor value without the option
    # Distractors are as salient as lesions: dense nuclei make them darker than stroma.
    cells = np.repeat(np.repeat(distractor, 16, 0), 16, 1)
    stroma = np.repeat(np.repeat(with_d == 128, 16, 0), 16, 1)
    assert image1[cells].mean() < image1[stroma].mean() - 10
    assert image1[cells].mean() < image0[cells].mean() - 10  # painted where the mask says, not elsewhere


def test_distractors_do_not_depend_on_the_label() -> None:
    means = []
    for label in (0, 1):
        image, truth = _render(seed=5, label=label, distractor_fraction=0.05)
        cells = np.repeat(np.repeat(truth == DISTRACTOR, 16, 0), 16, 1)
        means.append(image[cells].astype(float).mean(0))
    assert np.abs(means[0] - means[1]).max() < 6  # same morphology and stain for both classes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lesion_foci": 0}, "lesion_foci"),
        ({"distractor_fraction": 1.0}, "distractor_fraction"),
        ({"distractor_fraction": 0.05, "num_classes": 4}, "lymphoid"),
        ({"distractor_fraction": 0.05, "task": "diagnosis"}, "lymphoid"),
    ],
)
def test_bad_regime_parameters_touch_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"task": "subtype", "num_slides": 2, "size": 1024} | kwargs
    with pytest.raises(ValueError, match=message):
        synthesize_cohort(tmp_path / "c", **args)
    assert not (tmp_path / "c").exists()


def test_cli_options_reach_the_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        synth_main(["--help"])
    help_text = capsys.readouterr().out
    assert "--lesion_foci" in help_text and "--distractor_fraction" in help_text and "default 0" in help_text
    out = tmp_path / "cohort"
    argv = ["--num-slides", "2", "--size", "1024", "--workers", "1"]
    assert synth_main([*argv, "--out", str(out), "--lesion_foci", "3", "--distractor_fraction", "0.05"]) == 0
    info = json.loads((out / "synth.json").read_text())
    assert info["params"]["lesion_foci"] == 3 and info["params"]["distractor_fraction"] == 0.05
    assert all(s["distractor_fraction"] > 0 for s in info["slides"])
    assert cli_main(["synth", *argv, "--out", str(tmp_path / "bad"), "--distractor_fraction", "2"]) == 2
    assert "distractor_fraction" in capsys.readouterr().err
