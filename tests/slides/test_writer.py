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


def _tifffile_levels_and_mpp(path: Path) -> tuple[list[tuple[int, int]], float | None]:
    """Levels of tifffile's first series (W, H) and the MPP its metadata states (SVS or OME)."""
    import tifffile
    from tifffile.tifffile import svs_description_metadata

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = [(lv.shape[1], lv.shape[0]) for lv in series.levels]
        if tif.is_svs:
            return levels, float(svs_description_metadata(tif.pages[0].description)["MPP"])
        import re

        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        return levels, float(match.group(1)) if match else None


@pytest.mark.parametrize("fmt", ["svs", "ome-tiff"])
def test_every_reader_sees_every_level_with_its_mpp(tmp_path: Path, fmt: str) -> None:
    """tifffile, tiffslide and (for SVS) OpenSlide see the same 3 levels and the MPP written.

    Before the Aperio layout (no thumbnail page, reduced levels flagged subfiletype=1) tifffile and tiffslide
    saw one level of an .svs: this test failed with [(1536, 1024)] against the three levels.
    """
    import tiffslide

    path = write_pyramidal_tiff(
        tmp_path / ("a.svs" if fmt == "svs" else "a.ome.tif"), _image(), mpp=0.25, fmt=fmt
    )
    expected = [(1536, 1024), (384, 256), (96, 64)]
    levels, mpp = _tifffile_levels_and_mpp(path)
    assert levels == expected and mpp == pytest.approx(0.25)
    with tiffslide.TiffSlide(path) as slide:
        assert list(slide.level_dimensions) == expected
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
    with openslide.OpenSlide(str(path)) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        if fmt == "svs":
            assert list(slide.level_dimensions) == expected
            assert slide.associated_images["thumbnail"].size[0] <= 1024  # the stripped page 1
        else:  # OpenSlide's generic TIFF does not read SubIFDs: level 0 only (tiffslide is preferred for it)
            assert list(slide.level_dimensions) == expected[:1]


def test_overlay_pyramid_is_seen_by_every_reader(tmp_path: Path) -> None:
    """Heatmap overlays go through the same writer (viz/overlap.py): a 10x overlay of a 40x slide."""
    import tiffslide

    path = write_pyramidal_tiff(
        tmp_path / "x.overlay.tif", _image(), mpp=1.0, objective_power=10, downsamples=(1, 4)
    )
    levels, mpp = _tifffile_levels_and_mpp(path)
    assert levels == [(1536, 1024), (384, 256)] and mpp == pytest.approx(1.0)
    with tiffslide.TiffSlide(path) as ts, openslide.OpenSlide(str(path)) as os_:
        assert ts.level_dimensions == os_.level_dimensions == ((1536, 1024), (384, 256))
        assert (
            float(ts.properties["tiffslide.objective-power"])
            == float(os_.properties["openslide.objective-power"])
            == 10
        )


def test_writer_is_deterministic(tmp_path: Path) -> None:
    for fmt in ("svs", "ome-tiff"):
        a = write_pyramidal_tiff(tmp_path / f"1.{fmt}", _image(), fmt=fmt).read_bytes()
        assert a == write_pyramidal_tiff(tmp_path / f"2.{fmt}", _image(), fmt=fmt).read_bytes()
