"""Overlapping-patch heatmaps: blending on hand-made arrays, captions, then `e2e-wsi heatmap --overlap`
on a trained run with its real slides (OpenSlide reads the pyramidal TIFF overlay it writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.cli import main
from e2e_wsi.inference.attention import overlap_attention
from e2e_wsi.runs import load_run
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.tissue import TissueMask
from e2e_wsi.viz.heatmap import format_caption
from e2e_wsi.viz.overlap import (
    blend_patch_values,
    overlap_grid,
    overlap_stride,
    overlay_downsample,
    pixel_localization,
)

# ---------------------------------------------------------------- blending


def _regular_grid(width: int, height: int, size: int, stride: int) -> np.ndarray:
    xs, ys = np.arange(0, width - size + 1, stride), np.arange(0, height - size + 1, stride)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def test_constant_attention_blends_to_a_constant_map_over_the_tissue() -> None:
    # 800 x 600 slide; 100-px patches overlapping by 0.75 (stride 25) on a tissue blob only.
    coords = _regular_grid(800, 600, 100, 25)
    on_tissue = (coords[:, 0] - 300) ** 2 + (coords[:, 1] - 250) ** 2 < 200**2
    coords = coords[on_tissue]
    blended, coverage = blend_patch_values(coords, np.full(len(coords), 0.37), 100, (800, 600), (150, 200))
    covered = coverage > 0
    assert covered.sum() > 0.2 * covered.size and not covered.all()
    # Coverage varies (1 at the rim, 16 inside) but the sum of weights / coverage does not.
    assert coverage.max() == 16 and coverage[covered].min() == 1
    np.testing.assert_allclose(blended[covered], 0.37, rtol=0, atol=1e-12)
    assert np.isnan(blended[~covered]).all()


def test_overlapping_patches_are_averaged_by_coverage() -> None:
    # Two 20-px patches on a 40 x 20 slide overlapping on x in [10, 20); map at full resolution.
    blended, coverage = blend_patch_values(
        np.array([[0, 0], [10, 0]]), np.array([0.2, 0.8]), 20, (40, 20), (20, 40)
    )
    assert coverage[:, :10].tolist() == [[1] * 10] * 20 and (coverage[:, 10:20] == 2).all()
    np.testing.assert_allclose(blended[:, :10], 0.2)
    np.testing.assert_allclose(blended[:, 10:20], 0.5)
    np.testing.assert_allclose(blended[:, 20:30], 0.8)
    assert np.isnan(blended[:, 30:]).all()


def test_blending_scales_patch_boxes_to_the_output_resolution() -> None:
    # A 100-px patch at (200, 0) of a 400 x 100 slide lands on columns 50-75 of a 100-wide map.
    blended, coverage = blend_patch_values(np.array([[200, 0]]), np.array([1.0]), 100, (400, 100), (25, 100))
    assert np.flatnonzero(coverage[0]).tolist() == list(range(50, 75))
    assert (coverage[:, 50:75] == 1).all()


def test_blending_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="2 patch coordinates but 3 values"):
        blend_patch_values(np.zeros((2, 2)), np.ones(3), 10, (100, 100), (10, 10))


@pytest.mark.parametrize(("overlap", "stride"), [(0.0, 256), (0.5, 128), (0.75, 64), (0.9, 26)])
def test_stride_follows_the_overlap(overlap: float, stride: int) -> None:
    assert overlap_stride(256, overlap) == stride


@pytest.mark.parametrize("overlap", [1.0, -0.1, 1.5])
def test_overlap_out_of_range_is_rejected(overlap: float) -> None:
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        overlap_stride(256, overlap)


def test_overlap_grid_keeps_only_tissue_patches() -> None:
    # Mask at downsample 10 of a 400 x 400 slide: tissue is the left half.
    mask = np.zeros((40, 40), dtype=bool)
    mask[:, :20] = True
    tissue = TissueMask(mask, 10.0, np.zeros((40, 40, 3), np.uint8), 8.0)
    coords = overlap_grid((400, 400), 100, 50, tissue, 0.5)
    assert len(coords) == 3 * 7  # x in {0, 50, 100} (tissue share > 0.5) x 7 rows
    assert set(coords[:, 0].tolist()) == {0, 50, 100}


def test_pixel_localisation_auroc_against_a_truth_mask() -> None:
    truth = np.zeros((20, 20), dtype=np.uint8)
    truth[5:15, 5:15] = 128
    truth[5:10, 5:10] = 255
    perfect = np.where(truth == 255, 0.9, 0.1).astype(float)
    perfect[0, 0] = 5.0  # background pixels do not count, however high
    out = pixel_localization(perfect, truth)
    assert out == {"pixel_auroc": 1.0, "n_pixels": 100, "n_lesion_pixels": 25}
    assert pixel_localization(1.0 - perfect, truth)["pixel_auroc"] == 0.0
    uncovered = perfect.copy()
    uncovered[5:10, 5:10] = np.nan  # lesion not covered by any patch: nothing to rank
    assert pixel_localization(uncovered, truth)["pixel_auroc"] is None


def test_overlay_downsample_keeps_the_longest_side_within_the_cap() -> None:
    assert overlay_downsample((2048, 1024), 4096) == 1
    assert overlay_downsample((6144, 6144), 4096) == 2
    assert overlay_downsample((100_000, 80_000), 4096) == 32


# ---------------------------------------------------------------- captions


def test_caption_rounds_probability_to_3_digits_and_auroc_to_2() -> None:
    pred = {"probs": np.array([[0.0010000000474974513, 0.9990000128746033]], dtype=np.float32)}
    assert format_caption(pred) == "predicted: class 1 (p = 0.999)"
    assert (
        format_caption(pred, ["normal", "tumour"], {"pixel": 0.93449, "patch": 0.9})
        == "predicted: tumour (p = 0.999) | lesion localisation AUROC: pixel 0.93, patch 0.90"
    )
    assert format_caption({"probs": np.array([0.61234, 0.38766])}, None, {"patch": None}) == (
        "predicted: class 0 (p = 0.612) | lesion localisation AUROC: patch n/a"
    )
    assert format_caption({"risk": np.array([1.23456])}) == "predicted risk: 1.23"


def test_caption_rejects_wrong_class_names() -> None:
    with pytest.raises(ValueError, match="1 class names for 2 classes"):
        format_caption({"probs": np.array([0.5, 0.5])}, ["only"])


# ---------------------------------------------------------------- on a trained run


def _lesion_slide(manifest: Path, cache: PatchCache) -> str:
    """A cached slide whose truth mask has lesion pixels."""
    for slide_id in cache.slide_ids():
        truth = np.asarray(Image.open(manifest.parent / "masks" / f"{slide_id}.png").convert("L"))
        if (truth == 255).sum() > 20:
            return slide_id
    pytest.fail("no synthetic slide has a lesion")


@pytest.fixture(scope="module")
def overlap_run(tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path_factory) -> tuple[Path, str, Path]:
    """`e2e-wsi heatmap --overlap 0.5` on a slide with lesions: (output folder, slide id, manifest)."""
    manifest, cache_dir = synth_cache
    slide_id = _lesion_slide(manifest, PatchCache(cache_dir))
    out = tmp_path_factory.mktemp("overlap")
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    args = ["heatmap", "--ckpt_path", str(ckpt), "--slide", slide_id, "--overlap", "0.5", "--out", str(out)]
    assert main([*args, "--mask_dir", str(manifest.parent / "masks")]) == 0
    return out, slide_id, manifest


def test_overlap_heatmap_reports_pixel_localisation_auroc(
    overlap_run: tuple[Path, str, Path], synth_cache: tuple[Path, Path]
) -> None:
    out, slide_id, manifest = overlap_run
    loc = json.loads((out / f"{slide_id}.localization.json").read_text())
    truth = np.asarray(Image.open(manifest.parent / "masks" / f"{slide_id}.png").convert("L"))
    assert isinstance(loc["pixel_auroc"], float) and 0.0 <= loc["pixel_auroc"] <= 1.0
    assert 0 < loc["n_lesion_pixels"] < loc["n_pixels"] <= int((truth > 0).sum())
    assert loc["overlap"] == 0.5
    # Patches overlapping by half: about 4x the cache's non-overlapping tissue patches.
    meta = PatchCache(synth_cache[1]).meta(slide_id)
    cached = meta["magnifications"][mag_key(10.0)]
    assert loc["stride_level0"] == cached["size_level0"] // 2
    assert 2.5 * cached["count"] < loc["n_patches"] < 5 * cached["count"] + 8
    with Image.open(out / f"{slide_id}.png") as img:
        assert img.format == "PNG" and img.size[0] > 800


def test_overlay_tiff_opens_with_openslide(overlap_run: tuple[Path, str, Path], synth_cache) -> None:
    out, slide_id, _ = overlap_run
    meta = PatchCache(synth_cache[1]).meta(slide_id)
    with openslide.OpenSlide(str(out / f"{slide_id}.overlay.tif")) as overlay:
        assert overlay.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        # 2048-px slides fit the 4096-px cap: the overlay is at level-0 resolution, with the slide's MPP.
        assert overlay.dimensions == tuple(meta["dimensions"])
        assert float(overlay.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(meta["mpp"])
        assert overlay.level_count >= 2
        overlay_rgb = np.asarray(overlay.get_thumbnail((256, 256)).convert("RGB"), dtype=float)
    with Slide(meta["source_path"]) as slide:
        slide_rgb = slide.read_downsampled(meta["dimensions"][0] / overlay_rgb.shape[1]).astype(float)
    h, w = min(overlay_rgb.shape[0], slide_rgb.shape[0]), min(overlay_rgb.shape[1], slide_rgb.shape[1])
    diff = np.abs(overlay_rgb[:h, :w] - slide_rgb[:h, :w]).mean(axis=2)
    # The colour map changes the tissue it covers; the background far from tissue stays the slide's.
    assert (diff > 30).mean() > 0.05
    white = slide_rgb[:h, :w].min(axis=2) > 235
    assert white.mean() > 0.05 and np.median(diff[white]) < 10


def test_chunked_scoring_matches_one_chunk(tiny_run: Path, synth_cache: tuple[Path, Path]) -> None:
    manifest, cache_dir = synth_cache
    cache = PatchCache(cache_dir)
    slide_id = _lesion_slide(manifest, cache)
    loaded = load_run(tiny_run / "checkpoints" / "last.ckpt")
    model, data_cfg = loaded.model, loaded.data
    kwargs = dict(
        magnification=10.0, patch_size=64, eval_patch_size=int(data_cfg["eval_patch_size"]), overlap=0.5
    )
    with Slide(cache.meta(slide_id)["source_path"]) as slide:
        small = overlap_attention(model, slide, slide_id, chunk_size=5, **kwargs)
        whole = overlap_attention(model, slide, slide_id, chunk_size=10_000, **kwargs)
    assert small.attention.attention.shape[1] > 10
    np.testing.assert_array_equal(small.attention.coords, whole.attention.coords)
    np.testing.assert_allclose(small.attention.attention, whole.attention.attention, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(small.outputs, whole.outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", ["1", "-0.2", "half"])
def test_cli_refuses_an_overlap_outside_0_1(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["heatmap", "--ckpt_path", "x.ckpt", "--slide", "s1", "--overlap", value])
    assert stop.value.code == 2
    assert "--overlap" in capsys.readouterr().err
