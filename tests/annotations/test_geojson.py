"""GeoJSON in and out: mask polygons, QuPath annotations as include / exclude regions, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import geojson
import numpy as np
import pytest
from shapely.geometry import box

from e2e_wsi.annotations.geojson import (
    AnnotationRules,
    apply_rules,
    check_annotation_dir,
    lesion_mask,
    mask_to_geometry,
    read_annotations,
    region_mask,
)
from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.cli import main as cli_main


def preprocess_main(argv: list[str]) -> int:
    """``e2e-wsi preprocess ARGV`` through the dispatcher (it turns input errors into exit 2)."""
    return cli_main(["preprocess", *argv])


def _qupath(path: Path, *regions: tuple[str | None, tuple[float, float, float, float]]) -> Path:
    """A GeoJSON file shaped like QuPath's export: annotations with a classification name."""
    features = []
    for name, (x0, y0, x1, y1) in regions:
        props: dict = {"objectType": "annotation"}
        if name is not None:
            props["classification"] = {"name": name, "color": [255, 0, 0]}
        ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        features.append(geojson.Feature(geometry=geojson.Polygon([ring]), properties=props))
    path.write_text(geojson.dumps(geojson.FeatureCollection(features)))
    return path


# ----------------------------------------------------------------------------------- pure functions


def test_mask_polygons_keep_holes_and_separate_pieces() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:10, 2:10] = True
    mask[4:6, 4:6] = False  # a hole
    mask[12:18, 12:18] = True
    geometry = mask_to_geometry(mask, downsample=16)
    assert geometry.is_valid and len(geometry.geoms) == 2
    assert sorted(len(p.interiors) for p in geometry.geoms) == [0, 1]
    # Contours run between pixel centres, so only the corners are cut (1/8 pixel each).
    assert geometry.area / 256 == pytest.approx(64 - 4 + 36, abs=1.0)
    assert geometry.bounds == pytest.approx((2 * 16, 2 * 16, 18 * 16, 18 * 16), abs=8)


def test_region_mask_samples_pixel_centres_exactly() -> None:
    out = region_mask(box(32, 48, 96, 64), (10, 10), downsample=16)
    expected = np.zeros((10, 10), dtype=bool)
    expected[3:4, 2:6] = True
    np.testing.assert_array_equal(out, expected)


def test_include_then_exclude(tmp_path: Path) -> None:
    path = _qupath(
        tmp_path / "s.geojson",
        ("Region*", (0, 0, 160, 160)),
        ("Pen", (0, 0, 80, 80)),
        (None, (0, 0, 320, 320)),  # unclassified: ignored
        ("Tumor", (200, 200, 320, 320)),  # neither include nor exclude
    )
    annotations = read_annotations(path, (320, 320))
    out = apply_rules(np.ones((20, 20), dtype=bool), 16, annotations, AnnotationRules(str(tmp_path)))
    expected = np.zeros((20, 20), dtype=bool)
    expected[:10, :10] = True
    expected[:5, :5] = False
    np.testing.assert_array_equal(out, expected)
    lesion = lesion_mask(path, (320, 320), downsample=16)
    assert lesion is not None and (lesion == 255).sum() == 7 * 7 and lesion[15, 15] == 255


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "s1.geojson"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"s1\.geojson: not valid JSON"):
        read_annotations(bad, (100, 100))
    bad.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(ValueError, match=r"s1\.geojson: not GeoJSON features"):
        read_annotations(bad, (100, 100))


def test_another_coordinate_space_is_refused(tmp_path: Path) -> None:
    path = _qupath(tmp_path / "s1.geojson", ("Pen", (0, 0, 5000, 900)))
    with pytest.raises(ValueError, match=r"s1\.geojson: .*another coordinate space"):
        read_annotations(path, (2048, 2048))


def test_a_file_naming_no_known_slide_is_refused(tmp_path: Path) -> None:
    _qupath(tmp_path / "slide_a.geojson", ("Pen", (0, 0, 10, 10)))
    _qupath(tmp_path / "typo.geojson", ("Pen", (0, 0, 10, 10)))
    with pytest.raises(ValueError, match=r"\['typo.geojson'\]"):
        check_annotation_dir(tmp_path, ["slide_a", "slide_b"])
    check_annotation_dir(tmp_path, ["slide_a", "typo"])  # every file names a slide: fine


# ------------------------------------------------------------------------ preprocessing with annotations


@pytest.fixture(scope="module")
def one_slide(synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """(job, its coords per magnification without annotations) for one synthetic slide.

    The grid is fixed at the slide origin and patches are kept on the tissue threshold alone, so that
    "exactly the patches it covers" is well defined: with the default tissue-anchored grid and the 95%
    coverage rule, editing the tissue mask may shift the grid or add low-tissue patches elsewhere.
    """
    manifest, _ = synth_cache
    job = jobs_from_manifest(manifest)[0]
    out = tmp_path_factory.mktemp("fixed_grid")
    preprocess([job], out, _fixed_grid_config(), workers=0, qc=False, progress=False)
    cache = PatchCache(out)
    return job, {m: cache.coords(job.slide_id, m) for m in (10.0, 5.0)}


def _fixed_grid_config(**kwargs) -> PreprocessConfig:
    return PreprocessConfig(
        magnifications=(10.0, 5.0), patch_size=64, grid_anchor="origin", min_coverage=0.0, **kwargs
    )


def _block(coords: np.ndarray, side: int) -> tuple[int, int]:
    """Top-left of a 512 x 512 block (on the 5x grid) fully covered by 10x patches."""
    have = {tuple(c) for c in coords.tolist()}
    for x in range(0, 2048, 512):
        for y in range(0, 2048, 512):
            if all((x + dx, y + dy) in have for dx in (0, side) for dy in (0, side)):
                return x, y
    pytest.fail("no fully tiled 512-px block on the synthetic slide")


def _inside(coords: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    return (coords[:, 0] >= x0) & (coords[:, 1] >= y0) & (coords[:, 0] < x1) & (coords[:, 1] < y1)


def test_an_exclusion_removes_exactly_the_patches_it_covers(one_slide, tmp_path: Path) -> None:
    job, base = one_slide
    x, y = _block(base[10.0], 256)
    notes = tmp_path / "notes"
    notes.mkdir()
    _qupath(notes / f"{job.slide_id}.geojson", ("Pen", (x, y, x + 512, y + 512)))
    config = _fixed_grid_config(annotations=AnnotationRules(str(notes)))
    rows = preprocess([job], tmp_path / "cache", config, workers=0, qc=False, progress=False)
    assert rows[0]["status"] == "ok"
    cache = PatchCache(tmp_path / "cache")
    for mag in (10.0, 5.0):
        before, after = base[mag], cache.coords(job.slide_id, mag)
        covered = _inside(before, x, y, x + 512, y + 512)
        assert covered.sum() == (4 if mag == 10.0 else 1)
        np.testing.assert_array_equal(after, before[~covered])
    assert cache.meta(job.slide_id)["params"]["annotations"]["exclude"][0] == "Ignore*"


def test_an_include_region_keeps_only_its_patches(one_slide, tmp_path: Path) -> None:
    job, base = one_slide
    x, y = _block(base[10.0], 256)
    notes = tmp_path / "notes"
    notes.mkdir()
    _qupath(notes / f"{job.slide_id}.geojson", ("Region*", (x, y, x + 512, y + 512)))
    out = tmp_path / "cache"
    args = ["--manifest", str(job.path.parent.parent / "manifest.csv"), "--out", str(out)]
    args += ["--magnifications", "10", "--patch-size", "64", "--workers", "0", "--quiet", "--no-qc"]
    args += ["--grid-anchor", "origin", "--min-coverage", "0"]
    assert preprocess_main([*args, "--annotations", str(notes), "--geojson"]) == 0
    after = PatchCache(out).coords(job.slide_id, 10.0)
    np.testing.assert_array_equal(after, base[10.0][_inside(base[10.0], x, y, x + 512, y + 512)])
    # --geojson: tissue contours of every slide, valid GeoJSON, inside the include region for this one.
    contours = json.loads((out / "geojson" / f"{job.slide_id}.geojson").read_text())
    assert contours["type"] == "FeatureCollection" and contours["features"]
    assert geojson.FeatureCollection(**contours).is_valid
    xs = [p[0] for f in contours["features"] for p in f["geometry"]["coordinates"][0]]
    assert min(xs) >= x - 16 and max(xs) <= x + 512 + 16


def test_preprocess_refuses_an_annotation_for_no_slide(
    synth_cache: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    _qupath(notes / "not_a_slide.geojson", ("Pen", (0, 0, 10, 10)))
    args = ["--manifest", str(synth_cache[0]), "--out", str(tmp_path / "c"), "--magnifications", "10"]
    assert preprocess_main([*args, "--annotations", str(notes), "--quiet"]) == 2
    assert "not_a_slide.geojson" in capsys.readouterr().err
