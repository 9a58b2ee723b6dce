"""End-to-end tests of `e2e-wsi preprocess` on synthetic slides: counts, content, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.cache.store import PatchCache, open_readonly
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.cli import main as cli_main
from e2e_wsi.slides.reader import Slide
from tests.helpers.cache import MAGS, lmdb_contents


def main(argv: list[str]) -> int:
    """``e2e-wsi preprocess ARGV`` through the dispatcher (it turns input errors into exit 2)."""
    return cli_main(["preprocess", *argv])


def test_kept_patches_cover_the_true_tissue_with_little_glass(cohort: Path, clean_cache: Path) -> None:
    cache = PatchCache(clean_cache)
    assert cache.slide_ids() == sorted(j.slide_id for j in jobs_from_manifest(cohort))
    for slide_id in cache.slide_ids():
        truth = np.asarray(Image.open(cohort.parent / "masks" / f"{slide_id}.png")) > 0
        for mag in MAGS:
            info = cache.meta(slide_id)["magnifications"][f"{mag:g}"]
            size = info["size_level0"]
            s = size // 16
            covered = np.zeros_like(truth)
            fractions = []
            for x, y in cache.coords(slide_id, mag):
                covered[y // 16 : y // 16 + s, x // 16 : x // 16 + s] = True
                fractions.append(truth[y // 16 : y // 16 + s, x // 16 : x // 16 + s].mean())
            # Defaults keep >= 95% of the detected tissue; the truth mask differs from it a little.
            assert info["tissue_coverage"] >= 0.95, (slide_id, mag)
            assert (covered & truth).sum() / truth.sum() >= 0.93, (slide_id, mag)
            # ... and no more glass than that needs: every patch touches tissue, most are mostly tissue.
            assert min(fractions) > 0 and np.mean(fractions) > 0.6, (slide_id, mag)
            assert cache.count(slide_id, mag) <= 1.5 * truth.sum() / s**2 + 2


def test_cached_patch_equals_slide_region(cohort: Path, clean_cache: Path) -> None:
    cache = PatchCache(clean_cache)
    slide_id = cache.slide_ids()[0]
    with Slide(cohort.parent / "slides" / f"{slide_id}.svs") as slide:
        for mag in MAGS:
            size = cache.meta(slide_id)["magnifications"][f"{mag:g}"]["size_level0"]
            for index in (0, cache.count(slide_id, mag) // 2, cache.count(slide_id, mag) - 1):
                x, y = cache.coords(slide_id, mag)[index]
                region = slide.read_rgb((int(x), int(y)), 0, (size, size)).resize(
                    (256, 256), Image.Resampling.BOX
                )
                patch = cache.get(slide_id, mag, index)
                assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
                assert np.abs(patch.astype(int) - np.asarray(region)).mean() < 6


def test_no_pickle_only_jpeg_and_json(clean_cache: Path) -> None:
    env = open_readonly(clean_cache / "patches.lmdb")
    kinds = {"P": 0, "M": 0, "H": 0, "F": 0}
    with env.begin() as txn:
        for key, value in txn.cursor():
            kind = bytes(key)[:1].decode()
            kinds[kind] += 1
            if kind == "P":
                assert bytes(value[:2]) == b"\xff\xd8", key
            else:
                json.loads(bytes(value))
    assert kinds["M"] == kinds["H"] == 3 and kinds["F"] == 1 and kinds["P"] > 100


def test_summary_and_qc(clean_cache: Path) -> None:
    summary = json.loads((clean_cache / "summary.json").read_text())
    assert [row["status"] for row in summary["slides"]] == ["ok"] * 3
    for row in summary["slides"]:
        assert (clean_cache / "qc" / f"{row['slide_id']}.png").is_file()
        assert sum(row["patches"].values()) > 0


def test_rerun_skips_and_param_change_needs_overwrite(
    cohort: Path, clean_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    jobs = jobs_from_manifest(cohort)[:1]
    preprocess(jobs, out, PreprocessConfig(MAGS), workers=0, progress=False)
    before = lmdb_contents(out)
    rows = preprocess(jobs, out, PreprocessConfig(MAGS), workers=0, progress=False)
    assert rows[0]["cached"] and lmdb_contents(out) == before
    with pytest.raises(ValueError, match="different parameters.*--overwrite"):
        preprocess(jobs, out, PreprocessConfig(MAGS, jpeg_quality=70), workers=0, progress=False)
    rows = preprocess(
        jobs, out, PreprocessConfig(MAGS, jpeg_quality=70), workers=0, progress=False, overwrite=True
    )
    assert not rows[0]["cached"]
    after = lmdb_contents(out)
    assert after.keys() == before.keys() and after != before
    assert PatchCache(out).meta(jobs[0].slide_id)["params"]["jpeg_quality"] == 70


def test_bad_inputs_reported_others_processed(bad_manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    argv = [
        "--manifest",
        str(bad_manifest),
        "--out",
        str(out),
        "--magnifications",
        "20",
        "10",
        "--workers",
        "2",
        "--quiet",
    ]
    assert main(argv) == 1
    rows = {r["slide_id"]: r for r in json.loads((out / "summary.json").read_text())["slides"]}
    ok = [s for s, r in rows.items() if r["status"] == "ok"]
    assert len(ok) == 2 and PatchCache(out).slide_ids() == sorted(ok)
    expected = {
        "truncated": "truncated or corrupt",
        "notaslide": "not a slide format",
        "nomag": "no magnification metadata",
        "white": "no tissue",
        "../evil": "invalid slide id",
    }
    for slide_id, words in expected.items():
        assert rows[slide_id]["status"] == "failed" and words in rows[slide_id]["reason"], rows[slide_id]
        assert "\n" not in rows[slide_id]["reason"]
    assert "failed slides" in capsys.readouterr().err
    # Accepting failures: same outcome, exit 0, good slides now skipped as cached.
    assert main([*argv, "--allow-failures"]) == 0


def test_shards_union_equals_single_run(cohort: Path, clean_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    base = [
        "--manifest",
        str(cohort),
        "--out",
        str(out),
        "--magnifications",
        "20",
        "10",
        "--workers",
        "0",
        "--quiet",
    ]
    assert main([*base, "--shard", "0/2"]) == 0 and main([*base, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.glob("*.lmdb")) == ["shard-00-of-02.lmdb", "shard-01-of-02.lmdb"]
    assert lmdb_contents(out).keys() - {b"F/format"} == lmdb_contents(clean_cache).keys() - {b"F/format"}
    assert PatchCache(out).slide_ids() == PatchCache(clean_cache).slide_ids()


def test_map_size_grows(cohort: Path, clean_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "small-map"
    preprocess(
        jobs_from_manifest(cohort), out, PreprocessConfig(MAGS), workers=0, progress=False, map_size=64 * 1024
    )
    assert lmdb_contents(out) == lmdb_contents(clean_cache)


def test_bad_cli_arguments(cohort: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path), "--magnifications", "10"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["--manifest", str(cohort), "--out", str(tmp_path), "--magnifications", "10", "--shard", "3/2"])
        == 2
    )


def test_summary_and_qc_report_coverage(clean_cache: Path) -> None:
    summary = json.loads((clean_cache / "summary.json").read_text())
    for mag in ("20", "10"):
        assert summary["coverage"][mag]["min_tissue_coverage"] >= 0.95
        assert 0 < summary["coverage"][mag]["mean_background_share"] < 0.5
    assert summary["params"]["min_coverage"] == 0.95 and summary["params"]["grid_anchor"] == "tissue"
    # The QC image carries the figures in a white box at the top left (dark text on white).
    row = summary["slides"][0]
    qc = np.asarray(Image.open(clean_cache / "qc" / f"{row['slide_id']}.png").convert("L"))
    box = qc[3:20, 3:200]
    assert (box < 80).mean() > 0.05 and (box > 240).mean() > 0.5


def test_cache_of_the_old_tiling_defaults_is_refused_by_the_new(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    jobs = jobs_from_manifest(cohort)[:1]
    old = PreprocessConfig(MAGS, min_coverage=0.0, grid_anchor="origin")
    preprocess(jobs, out, old, workers=0, qc=False, progress=False)
    with pytest.raises(ValueError, match=r"differs in grid_anchor, min_coverage\).*--overwrite"):
        preprocess(jobs, out, PreprocessConfig(MAGS), workers=0, qc=False, progress=False)
    rows = preprocess(jobs, out, PreprocessConfig(MAGS), workers=0, qc=False, progress=False, overwrite=True)
    assert rows[0]["status"] == "ok" and not rows[0]["cached"]
    assert PatchCache(out).meta(jobs[0].slide_id)["params"]["grid_anchor"] == "tissue"
