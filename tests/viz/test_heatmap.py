"""Attention heatmaps: the pure functions on hand-made arrays, then `e2e-wsi heatmap` on a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.cli import main
from e2e_wsi.inference.attention import SlideAttention, slide_attention
from e2e_wsi.inference.heatmaps import thumbnail_of
from e2e_wsi.runs import load_run
from e2e_wsi.viz.heatmap import (
    localization_summary,
    normalize_scores,
    overlay_grid,
    patch_lesion_labels,
)

# ---------------------------------------------------------------- normalize_scores


def test_rank_normalisation_is_uniform_and_keeps_order() -> None:
    rng = np.random.default_rng(0)
    scores = rng.exponential(size=101) ** 4  # heavily skewed, like softmax attention
    out = normalize_scores(scores, "rank")
    assert out.min() == 0.0 and out.max() == 1.0
    # Distinct scores -> ranks 0, 1/100, ..., 1: evenly spread whatever the skew.
    np.testing.assert_allclose(np.sort(out), np.linspace(0, 1, 101))
    order = np.argsort(scores)
    assert np.all(np.diff(out[order]) > 0)


def test_rank_normalisation_gives_ties_the_same_value() -> None:
    out = normalize_scores(np.array([3.0, 1.0, 2.0, 2.0]), "rank")
    assert out[2] == out[3] and out[1] < out[2] < out[0]


def test_percentile_normalisation_clips_outliers() -> None:
    scores = np.concatenate([np.linspace(0.0, 1.0, 999), [1000.0]])
    out = normalize_scores(scores, "percentile")
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(scores, [1, 99])
    # The outlier is clipped to 1 instead of squashing everything else towards 0.
    assert out[-1] == 1.0 and out[500] == pytest.approx((scores[500] - lo) / (hi - lo))
    assert 0.4 < out[500] < 0.6
    assert np.all(np.diff(out) >= 0)


def test_unknown_normalisation_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown normalisation 'zscore'"):
        normalize_scores(np.ones(3), "zscore")


# ---------------------------------------------------------------- overlay_grid


def _att(
    coords: list[tuple[int, int]], size: int, dims: tuple[int, int], attention: np.ndarray | None = None
) -> SlideAttention:
    n = len(coords)
    attention = np.full((1, n), 1.0 / n) if attention is None else attention
    return SlideAttention("s1", attention, np.asarray(coords, dtype=np.int64).reshape(-1, 2), size, dims)


def test_overlay_puts_each_patch_value_in_its_cells() -> None:
    # Slide 200 x 100 px, thumbnail 50 x 100 (h, w): half scale, so a 20-px patch covers 10 x 10 cells.
    att = _att([(20, 10), (100, 60)], 20, (200, 100))
    grid = overlay_grid(att, np.array([0.25, 0.75]), (50, 100))
    assert grid.shape == (50, 100)
    assert np.all(grid[5:15, 10:20] == 0.25)
    assert np.all(grid[30:40, 50:60] == 0.75)
    covered = np.zeros_like(grid, dtype=bool)
    covered[5:15, 10:20] = covered[30:40, 50:60] = True
    assert np.isnan(grid[~covered]).all()


def test_overlay_keeps_the_highest_value_where_patches_overlap() -> None:
    att = _att([(0, 0), (10, 0)], 20, (40, 40))
    grid = overlay_grid(att, np.array([0.9, 0.1]), (40, 40))
    assert np.all(grid[0:20, 10:20] == 0.9)  # the overlap
    assert np.all(grid[0:20, 20:30] == 0.1)


# ---------------------------------------------------------------- patch_lesion_labels


def test_patch_lesion_labels_against_known_lesion_squares() -> None:
    # Slide 400 x 400 px with a 100 x 100 truth mask (quarter scale); lesions at mask [0:25, 0:25]
    # (slide px 0-100) and [50:75, 50:75] (slide px 200-300); patches of 100 px.
    truth = np.zeros((100, 100), dtype=np.uint8)
    truth[0:25, 0:25] = 255
    truth[50:75, 50:75] = 255
    coords = np.array(
        [
            [0, 0],  # fully inside the first lesion
            [300, 300],  # touches no lesion
            [200, 200],  # fully inside the second lesion
            [240, 240],  # 60 x 60 px of lesion: 36% >= 25%
            [260, 260],  # 40 x 40 px of lesion: 16% < 25%
            [50, 50],  # 50 x 50 px of lesion: exactly 25%
        ]
    )
    labels = patch_lesion_labels(coords, 100, truth, (400, 400))
    assert labels.tolist() == [True, False, True, True, False, True]
    strict = patch_lesion_labels(coords, 100, truth, (400, 400), min_fraction=0.5)
    assert strict.tolist() == [True, False, True, False, False, False]


def test_patch_lesion_labels_ignore_grey_values() -> None:
    truth = np.full((10, 10), 128, dtype=np.uint8)  # only 255 is lesion
    assert not patch_lesion_labels(np.array([[0, 0]]), 10, truth, (10, 10)).any()


# ---------------------------------------------------------------- localization_summary


def _concentrated(labels: np.ndarray, on_lesion: bool, heads: int = 2) -> SlideAttention:
    rng = np.random.default_rng(1)
    target = labels if on_lesion else ~labels
    raw = np.where(target, 1.0, 1e-4) * rng.uniform(0.5, 1.0, size=(heads, len(labels)))
    attention = raw / raw.sum(axis=1, keepdims=True)
    coords = np.stack([np.arange(len(labels)) * 10, np.zeros(len(labels))], axis=1)
    return SlideAttention("s1", attention, coords, 10, (10 * len(labels), 10))


def test_attention_on_lesions_scores_auroc_one() -> None:
    labels = np.zeros(40, dtype=bool)
    labels[[3, 7, 8, 20, 33]] = True
    loc = localization_summary(_concentrated(labels, True), labels)
    assert loc["auroc"] == 1.0 and loc["auroc_per_head"] == [1.0, 1.0]
    assert loc["attention_on_lesion"] > 0.99
    assert (
        loc["n_patches"] == 40
        and loc["n_lesion_patches"] == 5
        and loc["lesion_share"] == pytest.approx(5 / 40)
    )
    json.dumps(loc)  # written as localization.json: plain JSON types only


def test_attention_away_from_lesions_scores_auroc_zero() -> None:
    labels = np.zeros(40, dtype=bool)
    labels[:10] = True
    loc = localization_summary(_concentrated(labels, False), labels)
    assert loc["auroc"] == 0.0 and loc["attention_on_lesion"] < 0.01


@pytest.mark.parametrize("lesion", [True, False])
def test_auroc_is_undefined_with_one_kind_of_patch(lesion: bool) -> None:
    labels = np.full(12, lesion)
    loc = localization_summary(_concentrated(labels, True), labels)
    assert loc["auroc"] is None and loc["auroc_per_head"] == [None, None]


# ---------------------------------------------------------------- end to end on a trained run


def _lesion_slide(manifest: Path, cache: PatchCache) -> tuple[str, np.ndarray]:
    """A slide whose truth mask gives both lesion and non-lesion patches at 10x, and its patch labels."""
    for slide_id in cache.slide_ids():
        mask_file = manifest.parent / "masks" / f"{slide_id}.png"
        meta = cache.meta(slide_id)
        truth = np.asarray(Image.open(mask_file).convert("L"))
        size = int(meta["magnifications"][mag_key(10.0)]["size_level0"])
        labels = patch_lesion_labels(cache.coords(slide_id, 10.0), size, truth, tuple(meta["dimensions"]))
        if 0 < labels.sum() < len(labels):
            return slide_id, labels
    pytest.fail("no synthetic slide has both lesion and non-lesion patches at 10x")


@pytest.fixture(scope="module")
def heatmap_run(tiny_run: Path, synth_cache: tuple[Path, Path]) -> tuple[Path, str, np.ndarray]:
    """`e2e-wsi heatmap --per_head` on a slide with lesions: (run folder, slide id, its patch labels)."""
    manifest, cache_dir = synth_cache
    slide_id, labels = _lesion_slide(manifest, PatchCache(cache_dir))
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    masks = manifest.parent / "masks"
    assert (
        main(
            ["heatmap", "--ckpt_path", str(ckpt), "--slide", slide_id, "--per_head", "--mask_dir", str(masks)]
        )
        == 0
    )
    return tiny_run, slide_id, labels


def test_heatmap_png_has_the_figure_size(heatmap_run: tuple[Path, str, np.ndarray]) -> None:
    run, slide_id, _ = heatmap_run
    png = run / "heatmaps" / f"{slide_id}.png"
    with Image.open(png) as img:
        width, height = img.size
        assert img.format == "PNG"
    # 14 x 9 inch figure at 100 dpi, cropped to its content.
    assert 800 < width <= 1400 and 500 < height <= 900


def test_per_head_maps_make_the_figure_taller(
    heatmap_run: tuple[Path, str, np.ndarray], tmp_path: Path
) -> None:
    run, slide_id, _ = heatmap_run
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (
        main(
            [
                "heatmap",
                "--ckpt_path",
                str(ckpt),
                "--slide",
                slide_id,
                "--out",
                str(tmp_path),
                "--normalize",
                "percentile",
                "--top_k",
                "4",
            ]
        )
        == 0
    )
    with (
        Image.open(tmp_path / f"{slide_id}.png") as merged_only,
        Image.open(run / "heatmaps" / f"{slide_id}.png") as per_head,
    ):
        assert per_head.height > merged_only.height + 100


def test_localization_json_reports_auroc(
    heatmap_run: tuple[Path, str, np.ndarray], synth_cache: tuple[Path, Path]
) -> None:
    run, slide_id, labels = heatmap_run
    loc = json.loads((run / "heatmaps" / f"{slide_id}.localization.json").read_text())
    assert loc["slide_id"] == slide_id
    assert isinstance(loc["auroc"], float) and 0.0 <= loc["auroc"] <= 1.0
    assert loc["n_patches"] == PatchCache(synth_cache[1]).count(slide_id, 10.0) == len(labels)
    assert loc["n_lesion_patches"] == int(labels.sum())
    assert len(loc["auroc_per_head"]) == 8  # the demo config's ABMILX heads
    assert 0.0 <= loc["attention_on_lesion"] <= 1.0


def test_slide_attention_covers_every_patch(tiny_run: Path, synth_cache: tuple[Path, Path]) -> None:
    loaded = load_run(tiny_run / "checkpoints" / "last.ckpt")
    model, data_cfg = loaded.model, loaded.data
    cache = PatchCache(synth_cache[1])
    slide_id = cache.slide_ids()[0]
    att, out = slide_attention(model, cache, slide_id, [10.0], int(data_cfg["eval_patch_size"]))
    n = cache.count(slide_id, 10.0)
    assert att.attention.shape == (8, n) and out["outputs"].shape == (1, 2)
    np.testing.assert_allclose(att.attention.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(att.coords, cache.coords(slide_id, 10.0))


@pytest.mark.parametrize(
    ("slide", "message"), [("../x", "invalid slide id"), ("no_such_slide", "not in the cache")]
)
def test_bad_slide_ids_get_a_clear_error(
    tiny_run: Path, slide: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    assert main(["heatmap", "--ckpt_path", str(ckpt), "--slide", slide, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_checkpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["heatmap", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--slide", "s1"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_run_folder_gives_its_best_checkpoint(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    slide_id = PatchCache(synth_cache[1]).slide_ids()[0]
    assert main(["heatmap", "--run", str(tiny_run), "--slide", slide_id, "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"{slide_id}.png").is_file()
    assert not (tmp_path / f"{slide_id}.localization.json").exists()  # no truth given, none guessed


def test_lesion_annotations_are_heatmap_ground_truth(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    import geojson

    manifest, cache_dir = synth_cache
    slide_id, labels = _lesion_slide(manifest, PatchCache(cache_dir))
    truth = np.asarray(Image.open(manifest.parent / "masks" / f"{slide_id}.png").convert("L"))
    from e2e_wsi.annotations.geojson import mask_to_geometry

    lesion = mask_to_geometry(truth == 255, 2048 / truth.shape[1])
    feature = geojson.Feature(
        geometry=lesion.__geo_interface__, properties={"classification": {"name": "Tumor"}}
    )
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / f"{slide_id}.geojson").write_text(geojson.dumps(geojson.FeatureCollection([feature])))
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    assert (
        main(
            [
                "heatmap",
                "--ckpt_path",
                str(ckpt),
                "--slide",
                slide_id,
                "--out",
                str(out),
                "--annotations",
                str(notes),
            ]
        )
        == 0
    )
    loc = json.loads((out / f"{slide_id}.localization.json").read_text())
    # The annotation traced from the mask labels (almost) the same patches as the mask itself.
    assert abs(loc["n_lesion_patches"] - int(labels.sum())) <= max(1, int(0.1 * labels.sum()))


def test_thumbnail_is_read_through_the_slide(synth_cache: tuple[Path, Path]) -> None:
    cache = PatchCache(synth_cache[1])
    meta = cache.meta(cache.slide_ids()[0])
    thumb = thumbnail_of(meta, max_side=256)
    assert thumb.shape == (256, 256, 3) and thumb.dtype == np.uint8
    assert thumb.std() > 5  # real pixels, not the white fallback
    missing = thumbnail_of({**meta, "source_path": "/nowhere/x.svs"}, max_side=256)
    assert (missing == 255).all()
