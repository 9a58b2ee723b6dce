"""Impossible heatmap inputs are refused (issue 21 item 9): coordinates outside the slide or NaN (read as
int64 min), and a ground-truth mask of another aspect ratio (it used to be stretched and scored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e_wsi.errors import UserError
from e2e_wsi.inference.results import SlideAttention, check_coords
from e2e_wsi.viz.heatmap import find_truth_mask


@pytest.mark.parametrize(
    "bad", [[np.nan, 0.0], [np.iinfo(np.int64).min, 0], [4096, 10], [10, 3000], [-1, 0], [np.inf, 5]]
)
def test_coordinates_outside_the_slide_are_refused(bad: list[float]) -> None:
    coords = np.array([[0, 0], [256, 512], bad], dtype=np.float64)
    with pytest.raises(UserError, match=r"f.h5: 1 of 3 patch coordinates are NaN or outside the 4096x3000"):
        check_coords(coords, (4096, 3000), "f.h5")
    with pytest.raises(UserError, match="slide 's1'"):
        SlideAttention("s1", np.ones((1, 3)) / 3, coords, 256, (4096, 3000))


def test_coordinates_inside_the_slide_pass() -> None:
    coords = np.array([[0, 0], [4095, 2999], [3968, 2944]], dtype=np.int64)  # a patch may overhang
    check_coords(coords, (4096, 3000), "f.h5")


def test_a_mask_of_another_aspect_ratio_is_refused(tmp_path: Path) -> None:
    dims = (4096, 3000)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((187, 256), np.uint8)).save(good)  # 4096x3000 at downsample 16 (187.5 -> 187)
    assert find_truth_mask("s1", dims, mask=good).shape == (187, 256)
    square = tmp_path / "square.png"
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(square)
    with pytest.raises(UserError, match=r"square.png: the mask is 256x256 pixels but the slide is 4096x3000"):
        find_truth_mask("s1", dims, mask=square)
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((100, 256), np.uint8)).save(tmp_path / "masks" / "s1.png")
    with pytest.raises(UserError, match="aspect ratio"):
        find_truth_mask("s1", dims, mask_dir=tmp_path / "masks")
