"""The HDF5 feature store: round trip, atomic writes, validation, folder consistency checks."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from e2e_wsi.features.store import (
    PROVENANCE_ATTR,
    FeatureFolder,
    make_provenance,
    read_info,
    read_slide,
    write_slide,
)

ENC = {"class": "x.Enc", "name": "a", "out_dim": 8}


def arrays(n: int = 5, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 10_000, size=(n, 2))


def test_round_trip_keeps_arrays_and_provenance(tmp_path: Path) -> None:
    feats, coords = arrays()
    prov = make_provenance(ENC, 10.0, 256)
    path = write_slide(tmp_path, "s1", feats, coords, prov)
    got_f, got_c = read_slide(path)
    np.testing.assert_array_equal(got_f, feats)
    np.testing.assert_array_equal(got_c, coords)
    info = read_info(path)
    assert (info.num_patches, info.dim) == (5, 8)
    assert info.provenance["encoder"] == ENC and info.provenance["magnification"] == 10.0
    with h5py.File(path) as f:  # CLAM/TRIDENT layout: plain datasets, provenance is a JSON string
        assert set(f.keys()) == {"features", "coords"} and isinstance(f.attrs[PROVENANCE_ATTR], str)
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]  # no temp file left


def test_nan_features_are_refused_naming_the_slide(tmp_path: Path) -> None:
    feats, coords = arrays()
    feats[2, 3] = np.inf
    with pytest.raises(ValueError, match="'bad'.*NaN or Inf"):
        write_slide(tmp_path, "bad", feats, coords, None)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with h5py.File(tmp_path / "other.h5", "w") as f:  # written by another tool
        f["features"], f["coords"] = feats, coords
    with pytest.raises(ValueError, match="'other'.*NaN or Inf"):
        read_slide(tmp_path / "other.h5")


def test_file_without_features_dataset_is_named(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["coords"] = np.zeros((3, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"s\.h5: no dataset\(s\) \['features'\]"):
        read_info(tmp_path / "s.h5")


def test_slide_ids_are_not_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid slide id"):
        write_slide(tmp_path, "../evil", *arrays(), None)


def test_check_lists_every_missing_slide_at_once(tmp_path: Path) -> None:
    write_slide(tmp_path, "a", *arrays(), make_provenance(ENC, 10, 64))
    with pytest.raises(ValueError, match=r"2 manifest slide\(s\) have no features.*'b', 'c'"):
        FeatureFolder(tmp_path).check(["a", "b", "c"])


def test_check_refuses_a_mixed_folder_and_says_how(tmp_path: Path) -> None:
    for s in ("a", "b", "c"):
        write_slide(tmp_path, s, *arrays(), make_provenance(ENC, 10, 64))
    write_slide(tmp_path, "d", *arrays(), make_provenance({**ENC, "name": "other"}, 10, 64))
    write_slide(tmp_path, "e", *arrays(), make_provenance(ENC, 20, 64))
    with pytest.raises(ValueError) as info:
        FeatureFolder(tmp_path).check(["a", "b", "c", "d", "e"])
    text = str(info.value)
    assert "'d' differ" in text and "encoder.name: 'a' vs 'other'" in text
    assert "'e' differ" in text and "magnification: 10.0 vs 20.0" in text
    assert FeatureFolder(tmp_path).check(["a", "b", "c"])["encoder"] == ENC  # the consistent subset is fine


def test_check_refuses_mixed_widths_and_a_wrong_expected_width(tmp_path: Path) -> None:
    write_slide(tmp_path, "a", *arrays(d=8), None)
    write_slide(tmp_path, "b", *arrays(d=4), None)
    with pytest.raises(ValueError, match="mixes feature widths"):
        FeatureFolder(tmp_path).check(["a", "b"])
    with pytest.warns(UserWarning, match="no e2e-wsi provenance"):
        assert FeatureFolder(tmp_path).check(["a"]) is None
    with pytest.raises(ValueError, match="are 8-d but the model expects 16-d"):
        FeatureFolder(tmp_path).check(["a"], expected_dim=16)


def test_provenance_is_plain_json(tmp_path: Path) -> None:
    path = write_slide(tmp_path, "a", *arrays(), make_provenance(ENC, 10, 64, precision="16"))
    with h5py.File(path) as f:
        record = json.loads(f.attrs[PROVENANCE_ATTR])
    assert record["precision"] == "16" and record["slide_id"] == "a" and record["num_patches"] == 5
    with pytest.raises(TypeError):
        make_provenance({"class": object()}, 10, 64)
