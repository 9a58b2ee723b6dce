"""write_pyramidal_tiff: files that OpenSlide opens as Aperio SVS or generic tiled TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from e2e_wsi.slides.writer import write_pyramidal_tiff


def _image(height: int = 1024, width: int = 1536) -> np.ndarray:
    """Smooth colour gradients (JPEG keeps them well) with a dark block to locate."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([200 + 50 * xx / width, 100 + 100 * yy / height, np.full_like(xx, 180.0)], -1)
    image[256:512, 512:768] = (60, 30, 120)
    return image.astype(np.uint8)


def test_aperio_metadata_levels_and_pixels(tmp_path: Path) -> None:
    image = _image()
    path = write_pyramidal_tiff(tmp_path / "a.svs", image)
    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert slide.dimensions == (1536, 1024)
        assert slide.level_dimensions[2] == (96, 64)
        assert float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 40
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        region = np.asarray(slide.read_region((0, 0), 0, (1536, 1024)).convert("RGB")).astype(int)
        assert np.abs(region - image).mean() < 2.0
        low = np.asarray(slide.read_region((512, 256), 2, (16, 16)).convert("RGB")).astype(int)
        assert np.abs(low[4:12, 4:12] - np.array([60, 30, 120])).max() < 12


def test_custom_metadata_is_reported(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(
        tmp_path / "b.svs", _image(512, 512), mpp=0.5, objective_power=20, downsamples=(1, 2, 8), tile=128
    )
    with openslide.OpenSlide(str(path)) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 20
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 8.0))
        assert slide.properties["openslide.level[0].tile-width"] == "128"


def test_generic_tiff_has_no_magnification(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "g.tif", _image(), mpp=None, objective_power=None)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert openslide.PROPERTY_NAME_OBJECTIVE_POWER not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_Y not in slide.properties


@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros((64, 64, 3), np.float32), {}, "uint8"),
        (np.zeros((64, 64), np.uint8), {}, r"\[H, W, 3\]"),
        (np.zeros((512, 512, 3), np.uint8), {"downsamples": (2, 4)}, "start at 1"),
        (np.zeros((512, 512, 3), np.uint8), {"downsamples": (1, 4, 4)}, "increase"),
        (np.zeros((512, 512, 3), np.uint8), {"tile": 100}, "multiple of 16"),
        (np.zeros((512, 512, 3), np.uint8), {"mpp": -1.0}, "mpp"),
        (np.zeros((8, 8, 3), np.uint8), {}, "smaller than"),
    ],
)
def test_bad_input_is_rejected(tmp_path: Path, image: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_pyramidal_tiff(tmp_path / "bad.svs", image, **kwargs)
    assert not (tmp_path / "bad.svs").exists()
