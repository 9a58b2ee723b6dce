"""`e2e-wsi heatmap` on a two-stage (feature) run: attention over the stored features, at their coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.cli import main
from e2e_wsi.features.store import FeatureFolder
from e2e_wsi.inference.features import feature_attention, slide_file_from_manifest
from e2e_wsi.runs import load_run
from tests.helpers.features import TINY_FEATURE_FIT, TWO_STAGE_CONFIG, extract_random_resnet


@pytest.fixture(scope="module")
def feature_run(
    synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(checkpoint, features) of one epoch of two-stage ABMILX on random ResNet-18 features at 5x."""
    manifest, cache_dir = synth_cache
    root = tmp_path_factory.mktemp("feature_run")
    features = extract_random_resnet(cache_dir, root / "r18", seed=0)
    run = root / "run"
    args = ["fit", "--config", str(TWO_STAGE_CONFIG), "--data.manifest", str(manifest), "--data.features_dir",
            str(features), "--run_dir", str(run), *TINY_FEATURE_FIT]  # fmt: skip
    assert main(args) == 0
    return run / "checkpoints" / "last.ckpt", features


def test_heatmap_cli_on_a_feature_run(
    synth_cache: tuple[Path, Path], feature_run: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, _ = synth_cache
    ckpt, features = feature_run
    slide = FeatureFolder(features).slide_ids()[0]
    masks = manifest.parent / "masks"
    args = ["heatmap", "--ckpt_path", str(ckpt), "--slide", slide, "--out", str(tmp_path), "--per_head"]
    assert main([*args, "--mask_dir", str(masks)]) == 0
    assert (tmp_path / f"{slide}.png").stat().st_size > 0
    loc = json.loads((tmp_path / f"{slide}.localization.json").read_text())
    _, coords = FeatureFolder(features).read(slide)
    assert loc["slide_id"] == slide and loc["n_patches"] == len(coords)  # one score per feature
    assert not list(tmp_path.glob(".*tmp*"))


def test_feature_attention_sits_on_the_feature_coordinates(
    synth_cache: tuple[Path, Path], feature_run: tuple[Path, Path]
) -> None:
    manifest, cache_dir = synth_cache
    ckpt, features = feature_run
    folder = FeatureFolder(features)
    slide = folder.slide_ids()[1]
    loaded = load_run(ckpt)
    att, out = feature_attention(loaded, folder, slide, slide_file_from_manifest(manifest, slide))
    feats, coords = folder.read(slide)
    assert att.attention.shape == (out["attention"].shape[1], len(feats))
    np.testing.assert_array_equal(att.coords, coords)
    np.testing.assert_allclose(att.attention.sum(axis=1), 1.0, rtol=1e-5)
    # Patch side from the provenance (64 px at 5x) and the slide's objective power: the cache's own squares.
    meta = PatchCache(cache_dir).meta(slide)
    assert att.size_level0 == int(meta["magnifications"][mag_key(5.0)]["size_level0"]) > 64
    assert att.dimensions == tuple(meta["dimensions"])
    # Without the slide file: the same attention, the grid step as side, a canvas from the coordinates.
    bare, _ = feature_attention(loaded, folder, slide)
    np.testing.assert_allclose(bare.attention, att.attention, rtol=1e-6)
    assert bare.size_level0 == att.size_level0
    assert bare.dimensions == tuple(int(v) for v in coords.max(axis=0) + att.size_level0)


def test_feature_heatmap_refusals(
    synth_cache: tuple[Path, Path], feature_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    manifest, cache_dir = synth_cache
    ckpt, features = feature_run
    slide = FeatureFolder(features).slide_ids()[0]
    base = ["heatmap", "--ckpt_path", str(ckpt), "--slide", slide, "--out", str(tmp_path / "maps")]
    # A ground truth cannot be placed without the slide's dimensions.
    bare_manifest = tmp_path / "no_path.csv"  # CLAM-style: no path column
    pd.read_csv(manifest).drop(columns="path").to_csv(bare_manifest, index=False)
    config = ckpt.parents[1] / "config.yaml"
    text = config.read_text().replace(str(manifest), str(bare_manifest))
    (tmp_path / "config.yaml").write_text(text)
    masks = str(manifest.parent / "masks")
    assert main([*base, "--config", str(tmp_path / "config.yaml"), "--mask_dir", masks]) == 2
    assert "needs its slide file" in capsys.readouterr().err
    # Features of another encoder: refused with the difference, nothing drawn.
    other = extract_random_resnet(cache_dir, tmp_path / "other", seed=1)
    assert main([*base, "--features_dir", str(other)]) == 2
    assert "made differently" in capsys.readouterr().err
    assert main([*base, "--overlap", "0.5"]) == 2
    assert "feature run" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


def test_geometry_without_slide_file_or_provenance() -> None:
    from e2e_wsi.inference.features import feature_geometry, grid_step

    coords = np.array([[1024, 512], [1536, 512], [1024, 1024], [3072, 2048]])  # a CLAM-style grid, step 512
    assert grid_step(coords) == 512
    assert feature_geometry(coords, None, None) == (512, (3584, 2560))
    single = np.array([[100, 200]])  # no step to read: the provenance's patch size, else 256 (CLAM's)
    assert feature_geometry(single, {"patch_size": 224, "magnification": 20.0}, None) == (224, (324, 424))
    assert feature_geometry(single, None, None) == (256, (356, 456))
