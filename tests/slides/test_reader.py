"""Tests of the OpenSlide wrapper: resolution resolution and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e2e_wsi.slides.reader import Slide, SlideError, resolve_resolution
from tests.helpers.slides import make_tissue_slide


def test_cmu_metadata_resolution(cmu_slide: Path) -> None:
    with Slide(cmu_slide) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.resolution.objective_power == pytest.approx(20.0)
        assert slide.resolution.mpp == pytest.approx(0.499)
        assert slide.resolution.source == "metadata"


def test_overrides_win_in_order(cmu_slide: Path) -> None:
    with Slide(cmu_slide, global_mpp=0.25) as slide:
        assert slide.resolution.mpp == 0.25 and slide.resolution.objective_power == pytest.approx(40.0)
    with Slide(cmu_slide, slide_mpp=1.0, global_mpp=0.25) as slide:
        assert slide.resolution.objective_power == pytest.approx(10.0)
        assert slide.resolution.source == "slide override"


def test_one_of_mpp_or_power_derives_the_other() -> None:
    only_power = resolve_resolution({"openslide.objective-power": "40"}, "x.svs")
    assert only_power.mpp == pytest.approx(0.25)
    only_mpp = resolve_resolution({"openslide.mpp-x": "1.0"}, "x.svs")
    assert only_mpp.objective_power == pytest.approx(10.0)


def test_missing_magnification_says_which_override(tmp_path: Path) -> None:
    bare = make_tissue_slide(tmp_path / "bare.tif", size=1024, mpp=None).path
    with pytest.raises(SlideError) as err:
        Slide(bare)
    assert "no magnification metadata" in err.value.reason and "--mpp" in err.value.reason
    assert err.value.path == str(bare)
    with Slide(bare, slide_mpp=0.5) as slide:  # the override makes it usable
        assert slide.resolution.objective_power == pytest.approx(20.0)


def test_bad_override_is_rejected(cmu_slide: Path) -> None:
    with pytest.raises(SlideError, match="is not a number of micrometres per pixel"):
        Slide(cmu_slide, global_mpp=-1.0)


def test_non_slide_and_missing_files(tmp_path: Path) -> None:
    fake = tmp_path / "fake.svs"
    fake.write_text("this is not a slide\n" * 100)
    with pytest.raises(SlideError, match="not a slide format"):
        Slide(fake)
    with pytest.raises(SlideError, match="file not found"):
        Slide(tmp_path / "absent.svs")


def test_reason_is_one_line() -> None:
    err = SlideError("a.svs", "first line\nsecond   line")
    assert err.reason == "first line second line" and str(err) == "a.svs: first line second line"


def test_read_downsampled_matches_level(tissue_slide) -> None:
    with Slide(tissue_slide.path) as slide:
        assert slide.best_level(16.0) == 2 and slide.best_level(8.0) == 1 and slide.best_level(3.99) == 1
        thumb = slide.read_downsampled(16.0)
        assert thumb.shape == (256, 256, 3) and thumb.dtype == np.uint8
        direct = np.asarray(slide.read_rgb((0, 0), 2, (256, 256)))
        assert np.abs(thumb.astype(int) - direct).mean() < 1.0
        half = slide.read_downsampled(32.0)  # no level there: resized from level 2
        assert half.shape == (128, 128, 3)
