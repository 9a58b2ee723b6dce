"""Feature files that TRIDENT and CLAM write open here, ours open there; files reaching outside are refused.

The "their writer" helpers follow what TRIDENT's ``save_h5``/``coords_to_h5`` and CLAM's ``save_hdf5``
do (per-dataset attribute dicts, row-chunked resizable datasets, ``None`` stored as the string
``'None'``), re-derived from their documentation and code; the "their reader" checks follow TRIDENT's
coords reader (``dict(f['coords'].attrs)``, the three keys it requires), its slide-encoder batch
(``attributes['patch_size_level0']``), CLAM's ``torch.load(pt_files/<id>.pt)`` and the official
two-stage loader (``torch.load(..., weights_only=True)``; ``get_seq_pos_fn`` from ``level_dim``,
``downsample`` and ``patch_size``, /work/official/datasets/data_utils.py:296-310).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.errors import UserError
from e2e_wsi.features.extract import ExtractConfig, extract_features
from e2e_wsi.features.store import FeatureFolder, read_info, read_slide
from e2e_wsi.inference.features import feature_geometry
from e2e_wsi.models.encoders import ResNetEncoder


def write_like_trident(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict[str, dict]) -> None:
    """A feature file as TRIDENT's writer lays it out (resizable, row-chunked, attributes per dataset)."""
    with h5py.File(path, "w") as f:
        for key, value in {"features": features, "coords": coords}.items():
            chunks = (1,) + value.shape[1:] if value.shape[0] else None
            dset = f.create_dataset(
                key, data=value, maxshape=(None,) + value.shape[1:], chunks=chunks or True
            )
            for name, attr in attrs.get(key, {}).items():
                dset.attrs[name] = "None" if attr is None else attr


def trident_attrs(name: str, encoder: str | None = "uni_v1") -> dict[str, dict[str, Any]]:
    """TRIDENT's attributes of a slide patched at 20x, 256 px, on a 40x scan (level-0 side 512)."""
    return {
        "features": {"name": name, "savetodir": "/x/features_uni_v1", "encoder": encoder},
        "coords": {
            "patch_size": 256,
            "patch_size_level0": 256 * 40 // 20,
            "level0_magnification": 40,
            "target_magnification": 20,
            "overlap": 0,
            "name": name,
            "savetodir": "/x",
            "level0_width": 4096,
            "level0_height": 3072,
        },
    }


def grid(n: int, side: int = 512) -> np.ndarray:
    return np.stack([np.arange(n) * side, np.zeros(n, dtype=np.int64)], axis=1).astype(np.int64)


def test_trident_attributes_become_provenance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_like_trident(
            tmp_path / f"{name}.h5", rng.normal(size=(4, 8)).astype(np.float32), grid(4), trident_attrs(name)
        )
    info = read_info(tmp_path / "a.h5")
    assert info.provenance["encoder"] == {"name": "uni_v1"}
    assert info.provenance["magnification"] == 20.0 and info.provenance["patch_size"] == 256
    assert info.provenance["patch_size_level0"] == 512 and info.provenance["source"] == "TRIDENT"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TRIDENT folder names its encoder: no "encoder unknown" warning
        settings = FeatureFolder(tmp_path).check(["a", "b"])
    assert settings["encoder"] == {"name": "uni_v1"} and settings["magnification"] == 20.0
    # Heatmap squares: TRIDENT's level-0 side, not the grid step (here 512 = side, so use a sparse grid)
    coords = np.array([[0, 0], [2048, 0]])
    assert feature_geometry(coords, info.provenance, None)[0] == 512
    assert feature_geometry(coords, None, None)[0] == 2048  # the fallback the attribute replaces


def test_trident_folder_with_another_encoder_is_refused_as_mixed(tmp_path: Path) -> None:
    write_like_trident(tmp_path / "a.h5", np.ones((2, 8), np.float32), grid(2), trident_attrs("a"))
    write_like_trident(
        tmp_path / "b.h5", np.ones((2, 8), np.float32), grid(2), trident_attrs("b", "conch_v15")
    )
    with pytest.raises(ValueError, match="conch_v15"):
        FeatureFolder(tmp_path).check(["a", "b"])


def test_empty_trident_file_is_caught_when_fit_checks_the_folder(tmp_path: Path) -> None:
    # TRIDENT saves "empty features" for a slide without patches: [0, D] features and [0, 2] coords.
    write_like_trident(tmp_path / "a.h5", np.ones((3, 8), np.float32), grid(3), trident_attrs("a"))
    write_like_trident(
        tmp_path / "empty.h5",
        np.empty((0, 8), np.float32),
        np.empty((0, 2), np.int64),
        trident_attrs("empty"),
    )
    with pytest.raises(UserError, match=r"empty\.h5: no patches \(0 feature rows"):
        FeatureFolder(tmp_path).check(["a", "empty"])  # what FeatureDataModule runs in setup("fit")


def test_clam_patch_attributes_give_the_level0_side(tmp_path: Path) -> None:
    # CLAM's patch files: patch_size at the patch level and that level's downsample (a pair).
    path = tmp_path / "s.h5"
    write_like_trident(
        path,
        np.ones((2, 8), np.float32),
        grid(2, 1024),
        {"coords": {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]),
                    "level_dim": np.array([1000, 800]), "name": "s"}},
    )  # fmt: skip
    prov = read_info(path).provenance
    assert prov == {"source": "CLAM", "patch_size": 256, "patch_size_level0": 1024}
    with pytest.warns(UserWarning, match="record no encoder"):
        FeatureFolder(tmp_path).check(["s"])


@pytest.fixture(scope="module")
def ours(synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Our extraction at 5x with --pt_files, and the cache it came from."""
    _, cache_dir = synth_cache
    out = tmp_path_factory.mktemp("ours") / "features"
    torch.manual_seed(0)
    config = ExtractConfig(magnification=5, input_size=32, progress=False, pt_files=True)
    rows = extract_features(cache_dir, out, ResNetEncoder(), config)
    assert {r["status"] for r in rows} == {"ok"}
    return out, cache_dir


def test_ours_open_in_tridents_coords_reader_and_slide_encoder_batch(ours: tuple[Path, Path]) -> None:
    out, cache_dir = ours
    cache = PatchCache(cache_dir)
    slide = cache.slide_ids()[0]
    meta = cache.meta(slide)
    with h5py.File(out / f"{slide}.h5", "r") as f:
        coords_attrs = dict(f["coords"].attrs)  # TRIDENT's read_coords
        features_attrs = dict(f["features"].attrs)
        coords = f["coords"][:]
    required = [coords_attrs.get(k) for k in ("patch_size", "level0_magnification", "target_magnification")]
    assert None not in required  # else TRIDENT raises KeyError('Missing essential attributes')
    assert int(coords_attrs["patch_size_level0"]) == meta["magnifications"]["5"]["size_level0"]
    assert coords_attrs["target_magnification"] == 5 and coords_attrs["patch_size"] == meta["patch_size"]
    assert coords_attrs["level0_magnification"] == meta["objective_power"]
    assert [coords_attrs["level0_width"], coords_attrs["level0_height"]] == meta["dimensions"]
    assert features_attrs["encoder"] == "resnet18" and features_attrs["name"] == slide
    # TRIDENT's patcher places patch i at coords[i] with side patch_size * level0 / target magnification
    side = (
        coords_attrs["patch_size"]
        * coords_attrs["level0_magnification"]
        / coords_attrs["target_magnification"]
    )
    assert side == coords_attrs["patch_size_level0"]
    np.testing.assert_array_equal(coords, cache.coords(slide, 5))


def test_ours_open_as_clam_and_official_pt_files(ours: tuple[Path, Path]) -> None:
    out, cache_dir = ours
    for slide in PatchCache(cache_dir).slide_ids():
        feats, _ = read_slide(out / f"{slide}.h5")
        bag = torch.load(out / "pt_files" / f"{slide}.pt", weights_only=True)  # the official loader
        assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32
        np.testing.assert_array_equal(bag.numpy(), feats)


def test_ours_give_the_official_grid_positions(ours: tuple[Path, Path]) -> None:
    out, cache_dir = ours
    slide = PatchCache(cache_dir).slide_ids()[0]
    with h5py.File(out / f"{slide}.h5", "r") as f:  # get_seq_pos_fn's arithmetic
        a = dict(f["coords"].attrs)
        img = a["level_dim"] * a["downsample"]
        patch = a["patch_size"] * a["downsample"]
        coords = f["coords"][:]
    assert abs(img[0] - a["level0_width"]) <= patch[0] and abs(img[1] - a["level0_height"]) <= patch[1]
    pos = coords // patch.astype(np.int64)
    assert len({tuple(p) for p in pos.tolist()}) == len(coords)  # one grid cell per patch


def test_pt_files_are_added_when_a_finished_folder_is_resumed(
    ours: tuple[Path, Path], tmp_path: Path
) -> None:
    out, cache_dir = ours
    torch.manual_seed(0)
    first = tmp_path / "f"
    extract_features(
        cache_dir, first, ResNetEncoder(), ExtractConfig(magnification=5, input_size=32, progress=False)
    )
    assert not (first / "pt_files").exists()
    torch.manual_seed(0)
    config = ExtractConfig(magnification=5, input_size=32, progress=False, pt_files=True)
    rows = extract_features(cache_dir, first, ResNetEncoder(), config)
    assert {r["status"] for r in rows} == {"skipped"}
    assert sorted(p.stem for p in (first / "pt_files").glob("*.pt")) == PatchCache(cache_dir).slide_ids()


# ------------------------------------------------------------------ files that reach outside themselves
def _plain(path: Path, n: int = 3) -> None:
    with h5py.File(path, "w") as f:
        f["features"], f["coords"] = np.ones((n, 4), np.float32), grid(n)


def test_external_raw_storage_is_refused_naming_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "outside.bin"
    secret.write_bytes(np.arange(12, dtype=np.float32).tobytes())  # a file outside the folder
    path = tmp_path / "feats" / "s.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f.create_dataset("features", shape=(3, 4), dtype=np.float32, external=[(str(secret), 0, 48)])
        f["coords"] = grid(3)
    with pytest.raises(UserError, match=r"s\.h5: `features` uses external raw storage"):
        read_slide(path)


def test_external_link_is_refused_naming_the_file(tmp_path: Path) -> None:
    _plain(tmp_path / "other.h5")
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["features"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/features")
        f["coords"] = grid(3)
    with pytest.raises(UserError, match=r"s\.h5: `features` is a ExternalLink"):
        FeatureFolder(tmp_path).check(["s"])


def test_virtual_dataset_is_refused_naming_the_file(tmp_path: Path) -> None:
    _plain(tmp_path / "other.h5")
    layout = h5py.VirtualLayout(shape=(3, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "features", shape=(3, 4))
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("features", layout)
        f["coords"] = grid(3)
    with pytest.raises(UserError, match=r"s\.h5: `features` is a virtual dataset"):
        read_info(path)


def test_string_features_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.array([["a", "b"], ["c", "d"]], dtype=h5py.string_dtype())
        f["coords"] = grid(2)
    with pytest.raises(UserError, match=r"s\.h5: `features` holds object values, not numbers"):
        read_slide(path)
