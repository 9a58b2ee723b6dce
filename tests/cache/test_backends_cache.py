"""Caches from every slide format: ``synth --format`` cohorts, ``preprocess --backend``, the ``backend`` key."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import pytest

from e2e_wsi.cache.preprocess import jobs_from_dir, jobs_from_manifest, preprocess
from e2e_wsi.cache.store import PatchCache, meta_key
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.cli import main as cli_main
from e2e_wsi.synth.cohort import synthesize_cohort

MAGS = (10.0, 5.0)  # levels 1 (4x) and 1 again (8x from a 40x slide): offsets not aligned to the level


def main(argv: list[str]) -> int:
    """``e2e-wsi preprocess ARGV`` through the dispatcher (it turns input errors into exit 2)."""
    return cli_main(["preprocess", *argv])


def cache_main(argv: list[str]) -> int:
    """``e2e-wsi cache ARGV`` through the dispatcher."""
    return cli_main(["cache", *argv])


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 2-slide cohort (seed 0) written as SVS, OME-TIFF and DICOM."""
    root = tmp_path_factory.mktemp("formats")
    return {
        fmt: synthesize_cohort(root / fmt, num_slides=2, size=1024, workers=1, slide_format=fmt)
        for fmt in ("svs", "ome-tiff", "dicom")
    }


def _cache(manifest: Path, out: Path, backend: str | None = None) -> PatchCache:
    config = PreprocessConfig(MAGS, patch_size=64, backend=backend)
    preprocess(jobs_from_manifest(manifest), out, config, workers=0, qc=False, progress=False)
    return PatchCache(out)


def _patches(cache: PatchCache) -> dict[tuple[str, float, int], bytes]:
    return {
        (s, m, i): cache.get_bytes(s, m, i)
        for s in cache.slide_ids()
        for m in cache.magnifications(s)
        for i in range(cache.count(s, m))
    }


def test_same_cache_from_svs_ome_and_dicom(cohorts: dict[str, Path], tmp_path: Path) -> None:
    """tiffslide on the SVS, tiffslide on the OME-TIFF (auto) and wsidicom on the DICOM folders (auto) read the
    same JPEG tiles at the same level pixels: the caches hold byte-identical patches."""
    svs = _cache(cohorts["svs"], tmp_path / "svs", backend="tiffslide")
    ome = _cache(cohorts["ome-tiff"], tmp_path / "ome")
    dcm = _cache(cohorts["dicom"], tmp_path / "dcm")
    reference = _patches(svs)
    assert len(reference) > 20
    assert _patches(ome) == reference and _patches(dcm) == reference
    for cache, backend in ((svs, "tiffslide"), (ome, "tiffslide"), (dcm, "dicom")):
        assert {cache.meta(s)["backend"] for s in cache.slide_ids()} == {backend}


def test_dicom_folders_are_slides_of_a_slides_dir(cohorts: dict[str, Path]) -> None:
    slides = cohorts["dicom"].parent / "slides"
    jobs = jobs_from_dir(slides)
    assert [j.slide_id for j in jobs] == ["case0000-s0", "case0001-s0"] and all(j.path.is_dir() for j in jobs)


def test_backend_flag_recorded_and_shown(cohorts: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    argv = ["--manifest", str(cohorts["svs"]), "--out", str(out), "--magnifications", "10", "--workers", "0"]
    assert main([*argv, "--patch-size", "64", "--quiet", "--no-qc", "--backend", "tiffslide"]) == 0
    assert {PatchCache(out).meta(s)["backend"] for s in PatchCache(out).slide_ids()} == {"tiffslide"}
    capsys.readouterr()
    assert cache_main(["info", str(out)]) == 0
    assert "tiffslide" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--backend", "nosuch"])


def test_cache_without_backend_key_still_reads(cohorts: dict[str, Path], tmp_path: Path, capsys) -> None:
    """Caches written before backends have no ``backend`` key: they read, and info says OpenSlide read them."""
    config = PreprocessConfig(MAGS, patch_size=64)
    rows = preprocess(
        jobs_from_manifest(cohorts["svs"]), tmp_path / "old", config, workers=0, qc=False, progress=False
    )
    slide_id = rows[0]["slide_id"]
    env = lmdb.open(str(tmp_path / "old" / "patches.lmdb"), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        key = meta_key(slide_id)
        meta = json.loads(txn.get(key))
        del meta["backend"]
        txn.put(key, json.dumps(meta).encode())
        txn.delete(b"H/" + slide_id.encode())  # nor the metadata checksum (added later still)
    env.close()
    cache = PatchCache(tmp_path / "old")
    assert "backend" not in cache.meta(slide_id) and cache.get(slide_id, 10.0, 0).shape == (64, 64, 3)
    capsys.readouterr()
    assert cache_main(["info", str(tmp_path / "old")]) == 0
    assert "openslide" in capsys.readouterr().out


def test_plain_images_preprocess_with_mpp(tmp_path: Path) -> None:
    """TMA cores as PNG and stripped TIFF in a slides folder, cached through the image backend: without
    ``--mpp`` the TIFF is cut at its own resolution tags and the PNG (no resolution) fails; with it, both."""
    import numpy as np
    import tifffile
    from PIL import Image

    from tests.helpers.slides import tissue_image

    slides = tmp_path / "slides"
    slides.mkdir()
    image, _ = tissue_image(1024, seed=6)
    Image.fromarray(image).save(slides / "core_a.png")
    tifffile.imwrite(
        slides / "core_b.tif",
        image,
        photometric="rgb",
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
    )
    out = tmp_path / "cache"
    base = [
        "--out",
        str(out),
        "--magnifications",
        "10",
        "--patch-size",
        "64",
        "--workers",
        "0",
        "--quiet",
        "--no-qc",
    ]
    assert main(["--slides-dir", str(slides), *base]) == 1  # the PNG states no resolution
    rows = {r["slide_id"]: r for r in json.loads((out / "summary.json").read_text())["slides"]}
    assert rows["core_b"]["status"] == "ok" and "no magnification metadata" in rows["core_a"]["reason"]
    assert main(["--slides-dir", str(slides), *base, "--mpp", "0.5", "--overwrite"]) == 0
    cache = PatchCache(out)
    assert cache.slide_ids() == ["core_a", "core_b"]
    assert {cache.meta(s)["backend"] for s in cache.slide_ids()} == {"image"}
    assert cache.count("core_a", 10.0) > 10 and np.asarray(cache.get("core_a", 10.0, 0)).shape == (64, 64, 3)
