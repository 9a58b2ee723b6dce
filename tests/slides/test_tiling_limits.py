"""Bounded tiling (issue 21 item 15): `--magnifications 0.01` on a 4096^2 slide took 3.1 GB. Magnifications
below the documented limit are refused up front; a patch larger than the slide, or one that would read more
than MAX_READ_SIDE pixels a side from the nearest level, fails its slide with one line before any read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e2e_wsi.cache.preprocess import preprocess
from e2e_wsi.cache.worker import PreprocessConfig, SlideJob
from e2e_wsi.cli import main as cli_main
from e2e_wsi.errors import UserError
from e2e_wsi.slides import tiling
from e2e_wsi.slides.reader import Slide, SlideError
from e2e_wsi.slides.writer import write_pyramidal_tiff
from tests.helpers.slides import TestSlide


def test_a_magnification_below_the_limit_is_refused(tissue_slide: TestSlide, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match=r"--magnifications 0.01: below the limit of 0.1x"):
        PreprocessConfig((10.0, 0.01))
    args = ["--slides-dir", str(tissue_slide.path.parent), "--out", str(tmp_path / "c"), "--workers", "0"]
    assert cli_main(["preprocess", *args, "--magnifications", "0.01", "--quiet"]) == 2
    assert "below the limit of 0.1x" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_patch_larger_than_the_slide_fails_that_slide(tissue_slide: TestSlide, tmp_path: Path) -> None:
    config = PreprocessConfig((0.2,), patch_size=256)  # 20x slide: 25600 level-0 px per patch
    (row,) = preprocess(
        [SlideJob("t", tissue_slide.path)], tmp_path, config, workers=0, qc=False, progress=False
    )
    assert row["status"] == "failed"
    assert "covers 25600 level-0 pixels, more than the whole 4096x4096 slide" in row["reason"]


def test_reads_larger_than_the_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A slide without pyramid levels: 5x of a 20x slide reads 1024 px per 256-px patch from level 0.
    path = write_pyramidal_tiff(tmp_path / "flat.svs", np.full((2048, 2048, 3), 200, np.uint8), mpp=0.5,
                                objective_power=20, downsamples=(1,))  # fmt: skip
    with Slide(path) as slide:
        assert tiling.grid_spec(slide, 5.0, 256).read_size == 1024
        monkeypatch.setattr(tiling, "MAX_READ_SIDE", 512)  # the real limit (8192) needs a huge test slide
        with pytest.raises(SlideError, match=r"5x would read 1024x1024 pixels per patch .*the limit is 512"):
            tiling.grid_spec(slide, 5.0, 256)
