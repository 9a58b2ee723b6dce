"""Reader backends behind Slide: the same pixels through every backend, honest messages, formats.

Tolerance: a patch read at level 0, or at a level whose downsample divides the level-0 coordinates, is
identical through every backend on the same JPEG tiles (all decode with libjpeg-turbo). At other offsets
OpenSlide resamples the level at a sub-pixel offset (it paints with cairo at ``x / downsample``) while
tiffslide, wsidicom and the in-memory backends start at the level pixel ``floor(x / downsample)``; those
patches differ by a mean of a few grey levels, stated in ``test_pipeline_grid_within_tolerance``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from e2e_wsi.slides import find_slides, open_slide, slide_id_of
from e2e_wsi.slides.backends import BACKENDS, SlideBackend, register_backend
from e2e_wsi.slides.errors import SlideError
from e2e_wsi.slides.tiling import grid_spec, read_patch
from e2e_wsi.slides.writer import write_slide_levels
from tests.helpers.slides import tissue_image, write_czi


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2048-px synthetic slide as Aperio SVS, OME-TIFF and DICOM (same JPEG tiles in all three)."""
    root = tmp_path_factory.mktemp("copies")
    image, _ = tissue_image(2048, seed=3)
    common = {"mpp": 0.5, "objective_power": 20, "downsamples": (1, 4, 16), "tile": 256, "quality": 90}
    return {
        fmt: write_slide_levels(root / name, image, 1, image.shape[:2], fmt=fmt, key="copy", **common)
        for fmt, name in (("svs", "s.svs"), ("ome-tiff", "s.ome.tif"), ("dicom", "s_dicom"))
    }


def test_auto_backend_per_format(copies: dict[str, Path], cmu_slide: Path) -> None:
    expected = {"svs": "openslide", "ome-tiff": "tiffslide", "dicom": "dicom"}
    for fmt, path in copies.items():
        with open_slide(path) as slide:
            assert slide.backend == expected[fmt]
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0)), fmt
            assert slide.resolution.mpp == pytest.approx(0.5), fmt
    with open_slide(cmu_slide) as slide:
        assert slide.backend == "openslide"


@pytest.mark.parametrize("other", ["tiffslide", "ome-tiff", "dicom"])
def test_aligned_patches_identical_across_backends(copies: dict[str, Path], other: str) -> None:
    """Level-0 and downsample-aligned reads: bit-identical to OpenSlide on the SVS."""
    path, backend = (copies["svs"], "tiffslide") if other == "tiffslide" else (copies[other], None)
    with open_slide(copies["svs"], "openslide") as ref, open_slide(path, backend) as slide:
        for level, xy in ((0, (300, 517)), (0, (1900, 1900)), (1, (512, 768)), (2, (0, 0)), (1, (1984, 64))):
            size = (256, 200)
            got, want = _arr(slide.read_rgb(xy, level, size)), _arr(ref.read_rgb(xy, level, size))
            assert np.array_equal(got, want), (other, level, xy, np.abs(got - want).max())


def test_comparison_discriminates(copies: dict[str, Path]) -> None:
    """The equality above is not vacuous: a one-pixel shift is caught."""
    with open_slide(copies["svs"]) as slide:
        a, b = (
            _arr(slide.read_rgb((300, 517), 0, (256, 200))),
            _arr(slide.read_rgb((301, 517), 0, (256, 200))),
        )
    assert not np.array_equal(a, b)


def test_cmu_fixture_identical_through_tiffslide(cmu_slide: Path) -> None:
    """OpenSlide's own Aperio test slide (JPEG, 240-px tiles): tiffslide gives the same pixels."""
    with open_slide(cmu_slide, "openslide") as ref, open_slide(cmu_slide, "tiffslide") as slide:
        assert slide.dimensions == ref.dimensions and slide.resolution == ref.resolution
        spec = grid_spec(ref, 10.0, 224)  # 20x slide, one level: 448-px reads resized to 224
        for xy in ((0, 0), (900, 1400), (1772, 2519)):
            assert np.array_equal(
                _arr(read_patch(slide, spec, xy, 224)), _arr(read_patch(ref, spec, xy, 224))
            ), xy


def test_pipeline_grid_within_tolerance(copies: dict[str, Path]) -> None:
    """Patches on a grid not aligned to the level (5x from a 20x slide, level 1 at offsets 4k + 2): within
    a mean absolute difference of 5 grey levels of OpenSlide's (its sub-pixel resampling of a texture
    that changes every few pixels; measured 2.5 and 4.2), max < 128."""
    with open_slide(copies["svs"], "openslide") as ref, open_slide(copies["dicom"]) as slide:
        spec = grid_spec(ref, 5.0, 128)
        assert spec.level == 1
        diffs = [
            np.abs(_arr(read_patch(slide, spec, (x, y), 128)) - _arr(read_patch(ref, spec, (x, y), 128)))
            for x, y in ((514, 642), (1026, 1154))
        ]
    assert all(d.mean() < 5.0 and d.max() < 128 for d in diffs), [(d.mean(), d.max()) for d in diffs]
    assert any(d.max() > 0 for d in diffs)  # not aligned: the tolerance is needed, not vacuous


def test_plain_png_is_read_whole_with_in_memory_levels(tmp_path: Path) -> None:
    image, _ = tissue_image(1024, seed=1)
    Image.fromarray(image).save(tmp_path / "core.png")
    with pytest.raises(SlideError, match="no magnification metadata"):
        open_slide(tmp_path / "core.png")  # a PNG states no microscope resolution
    with open_slide(tmp_path / "core.png", global_mpp=0.5) as slide:
        assert slide.backend == "image" and slide.level_downsamples == (1.0, 4.0)
        assert np.array_equal(np.asarray(slide.read_rgb((100, 200), 0, (300, 100))), image[200:300, 100:400])
        reduced = np.asarray(Image.fromarray(image).reduce(4))
        assert np.array_equal(np.asarray(slide.read_rgb((0, 0), 1, (256, 256))), reduced)
        edge = np.asarray(slide.read_rgb((1000, 1000), 0, (48, 48)))  # overhangs: white glass
        assert (edge[24:, 24:] == 255).all() and np.array_equal(edge[:24, :24], image[1000:, 1000:])


def test_non_pyramidal_tiff_is_read_not_called_corrupt(tmp_path: Path) -> None:
    """A stripped TIFF OpenSlide refuses is a plain image with the file's MPP (0.5 um = 20,000 px/cm)."""
    image, _ = tissue_image(1024, seed=2)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend == "image"
        assert slide.resolution.mpp == pytest.approx(0.5) and slide.resolution.source == "metadata"
        assert np.array_equal(np.asarray(slide.read_rgb((10, 20), 0, (64, 64))), image[20:84, 10:74])


def test_jpeg_within_tolerance_and_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, _ = tissue_image(1024, seed=4)
    Image.fromarray(image).save(tmp_path / "b.jpg", quality=95)
    with open_slide(tmp_path / "b.jpg", global_mpp=0.5) as slide:
        assert np.abs(_arr(slide.read_rgb((0, 0), 0, (1024, 1024))) - image).mean() < 3.0
    import e2e_wsi.slides.backends.image as image_backend

    monkeypatch.setattr(image_backend, "PLAIN_IMAGE_MAX_PIXELS", 1000)
    with pytest.raises(SlideError, match="above the limit"):
        open_slide(tmp_path / "b.jpg", global_mpp=0.5)


def test_czi_scenes_on_one_plane(tmp_path: Path) -> None:
    """Two scenes written by pylibCZIrw at an offset: one slide, exact pixels, MPP from the scaling."""
    image, _ = tissue_image(1024, seed=5)
    path = write_czi(tmp_path / "s.czi", image, mpp=0.25, offset=(4000, 3000), scenes=2)
    with open_slide(path) as slide:
        assert slide.backend == "czi" and slide.dimensions == (1024, 1024)
        assert slide.resolution.mpp == pytest.approx(0.25) and slide.level_downsamples == (1.0, 4.0)
        assert np.array_equal(np.asarray(slide.read_rgb((400, 300), 0, (256, 256))), image[300:556, 400:656])
        # Without pyramid subblocks (libCZI writes none) a zoomed read takes every 4th pixel.
        assert np.array_equal(np.asarray(slide.read_rgb((0, 0), 1, (256, 256))), image[::4, ::4])


def test_unsupported_readable_file_names_the_backends(tmp_path: Path) -> None:
    fake = tmp_path / "doc.svs"
    fake.write_bytes(b"%PDF-1.4 not a slide\n" * 100)
    with pytest.raises(SlideError) as err:
        open_slide(fake)
    assert "not a slide format any backend reads" in err.value.reason
    assert all(name in err.value.reason for name in BACKENDS)
    with pytest.raises(SlideError, match="not a format the 'dicom' backend reads"):
        open_slide(tmp_path, "dicom")


def test_missing_library_names_the_extra(tmp_path: Path) -> None:
    """A backend whose library is absent is skipped, and forcing it says what to pip install."""

    class Absent(SlideBackend):
        name = "absent-test"
        extensions = (".absent",)
        module = "e2e_wsi_no_such_module"
        extra = "absent"

    register_backend(Absent)
    try:
        (tmp_path / "a.absent").write_bytes(b"\x00" * 64)
        with pytest.raises(SlideError, match=r"pip install 'e2e-wsi\[absent\]'"):
            open_slide(tmp_path / "a.absent", "absent-test")
        with pytest.raises(
            SlideError, match=r"not installed: absent-test \(pip install 'e2e-wsi\[absent\]'\)"
        ):
            open_slide(tmp_path / "a.absent")
    finally:
        del BACKENDS["absent-test"]


def test_dicom_folder_is_one_slide(copies: dict[str, Path]) -> None:
    folder = copies["dicom"]
    assert len(list(folder.glob("*.dcm"))) == 3
    assert find_slides(folder.parent) == sorted([copies["svs"], copies["ome-tiff"], folder])
    assert find_slides(folder) == [folder]  # pointing at the series itself: still one slide
    assert slide_id_of(folder) == "s_dicom" and slide_id_of(copies["ome-tiff"]) == "s"


def test_url_source_goes_to_tiffslide(copies: dict[str, Path]) -> None:
    """An fsspec URL (here ``file://``, so no network) is opened by the backend that reads URLs."""
    url = copies["svs"].resolve().as_uri()
    with open_slide(url) as slide, open_slide(copies["svs"]) as ref:
        assert slide.backend == "tiffslide" and slide.path == url
        assert slide.dimensions == ref.dimensions and slide.resolution == ref.resolution
        assert np.array_equal(
            np.asarray(slide.read_rgb((0, 0), 0, (256, 256))), np.asarray(ref.read_rgb((0, 0), 0, (256, 256)))
        )
