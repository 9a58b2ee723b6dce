"""Reliability of preprocess and the cache: absurd slides, the folder lock, manifests, integrity, paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import tifffile

from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.cache.store import (
    CacheCorruptedError,
    DamagedPatchError,
    PatchCache,
    patch_key,
    release,
    verify_cache,
)
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.cli import main as cli_main
from e2e_wsi.locks import CacheLock, CacheLockedError

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    """``e2e-wsi preprocess ARGV`` through the dispatcher (it turns input errors into exit 2)."""
    return cli_main(["preprocess", *argv])


def cache_main(argv: list[str]) -> int:
    """``e2e-wsi cache ARGV`` through the dispatcher."""
    return cli_main(["cache", *argv])


def _sparse_tiff(path: Path, side: int) -> Path:
    """A tiled TIFF claiming side x side px with a single stored tile (all others sparse, 0 bytes)."""
    tile = np.full((512, 512, 3), (210, 120, 170), np.uint8)
    n = (side // 512) ** 2

    def tiles():
        yield tile
        for _ in range(n - 1):
            yield None

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(
            tiles(),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(512, 512),
            photometric="rgb",
            compression="jpeg",
        )
    return path


@pytest.fixture(scope="module")
def guarded_cache(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One good slide and two sparse TIFFs with forged sizes, preprocessed together."""
    root = tmp_path_factory.mktemp("absurd")
    good = sorted((cohort.parent / "slides").glob("*.svs"))[0]
    shutil.copy(good, root / good.name)
    _sparse_tiff(root / "huge.tif", 200_192)  # 4.0e10 px > --max-pixels
    _sparse_tiff(root / "hollow.tif", 100_352)  # 1.0e10 px in a ~1 MB file
    rows = [f"{good.stem},{good.name},", "huge,huge.tif,0.5", "hollow,hollow.tif,0.5"]
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,path,mpp\n" + "\n".join(rows) + "\n")
    start = time.perf_counter()
    out = root / "cache"
    summary = preprocess(
        jobs_from_manifest(manifest), out, PreprocessConfig((20.0,)), workers=0, progress=False
    )
    assert time.perf_counter() - start < 60  # the old code spent minutes decoding the empty giant levels
    return out, summary


def test_absurd_dimensions_fail_fast_and_the_rest_is_cached(guarded_cache) -> None:
    out, rows = guarded_cache
    by_id = {r["slide_id"]: r for r in rows}
    assert by_id["huge"]["status"] == "failed" and "--max-pixels" in by_id["huge"]["reason"]
    assert "200,192 x 200,192" in by_id["huge"]["reason"]
    assert by_id["hollow"]["status"] == "failed" and "px per byte" in by_id["hollow"]["reason"]
    good = [r for r in rows if r["status"] == "ok"]
    assert len(good) == 1 and PatchCache(out).slide_ids() == [good[0]["slide_id"]]


def test_max_pixels_is_a_documented_flag(tmp_path: Path, cohort: Path) -> None:
    slide = sorted((cohort.parent / "slides").glob("*.svs"))[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path\ns,{slide}\n")
    args = ["--manifest", str(manifest), "--out", str(tmp_path / "c"), "--magnifications", "20"]
    assert main([*args, "--max-pixels", "1e6", "--workers", "0", "--quiet", "--no-qc"]) == 1
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert "more than --max-pixels" in summary["slides"][0]["reason"]


def test_summary_holds_coverage_and_background(guarded_cache) -> None:
    out, _ = guarded_cache
    row = [r for r in json.loads((out / "summary.json").read_text())["slides"] if r["status"] == "ok"][0]
    assert row["tissue_coverage"]["20"] >= 0.95 and 0 <= row["background_share"]["20"] < 0.5


# ------------------------------------------------------------------------------------------------ lock


def test_second_run_on_the_same_out_is_refused_with_the_holder(cohort: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from e2e_wsi.locks import CacheLock\n"
            f"with CacheLock({str(out / '.patches.lmdb.lock')!r}):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = ["--manifest", str(cohort), "--out", str(out), "--magnifications", "20", "--workers", "0"]
        assert main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and os.uname().nodename in err and "started" in err
        assert not (out / "patches.lmdb").exists()  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (even killed), the lock is free again.
    with CacheLock(out / ".patches.lmdb.lock"):
        with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"):
            with CacheLock(out / ".patches.lmdb.lock"):
                pass


# -------------------------------------------------------------------------------------------- manifest


def test_preprocess_reads_a_bom_and_spaced_header(cohort: Path, tmp_path: Path) -> None:
    slides = sorted((cohort.parent / "slides").glob("*.svs"))[:2]
    manifest = tmp_path / "excel.csv"
    body = " slide_id , path ,label\n" + "".join(f"{p.stem}, {p} ,0\n" for p in slides)
    manifest.write_bytes(b"\xef\xbb\xbf" + body.encode())
    jobs = jobs_from_manifest(manifest)
    assert [j.slide_id for j in jobs] == [p.stem for p in slides] and jobs[0].path == slides[0]


def test_zero_byte_manifest_is_a_clear_error(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "empty.csv"
    manifest.write_bytes(b"")
    assert main(["--manifest", str(manifest), "--out", str(tmp_path / "c"), "--magnifications", "10"]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- integrity


def _flip_byte(lmdb_dir: Path, key: bytes) -> None:
    """Flip one bit in the middle of a stored value, in place (as a failing disk would)."""
    release(lmdb_dir)
    env = lmdb.open(str(lmdb_dir), subdir=True)
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(key))
        value[len(value) // 2] ^= 0x10
        txn.put(key, bytes(value))
    env.close()


@pytest.fixture
def damaged_cache(clean_cache: Path, tmp_path: Path) -> tuple[Path, str, bytes]:
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    slide_id = PatchCache(out).slide_ids()[1]
    key = patch_key(slide_id, 20, 3)
    _flip_byte(out / "patches.lmdb", key)
    return out, slide_id, key


def test_verify_finds_a_flipped_byte(clean_cache: Path, damaged_cache, capsys) -> None:
    assert cache_main(["verify", str(clean_cache)]) == 0
    assert "OK" in capsys.readouterr().out
    out, slide_id, key = damaged_cache
    report = verify_cache(out)
    assert report.damaged == {slide_id: [(key.decode(), "checksum mismatch")]}
    assert cache_main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"slide {slide_id}: 1 damaged" in text and key.decode() in text and "DAMAGED" in text


def test_reading_a_damaged_patch_names_slide_and_key_or_skips(damaged_cache) -> None:
    out, slide_id, key = damaged_cache
    cache = PatchCache(out)
    with pytest.raises(DamagedPatchError, match=f"{key.decode()} of slide '{slide_id}'"):
        cache.get_many(slide_id, 20, [2, 3])
    skipping = PatchCache(out, on_damaged="skip")
    with pytest.warns(RuntimeWarning, match=key.decode()):
        patches = skipping.get_many(slide_id, 20, [3, 5])
    assert np.array_equal(patches[0], cache.get(slide_id, 20, 2))  # the nearest intact neighbour
    assert np.array_equal(patches[1], cache.get(slide_id, 20, 5))


def test_a_corrupted_lmdb_is_one_message_naming_the_cache(clean_cache: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    data = out / "patches.lmdb" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[4096 * 2 : 4096 * 4] = b"\xa5" * 8192  # trash two B-tree pages: lmdb raises CorruptedError
    data.write_bytes(bytes(raw))
    with pytest.raises(
        CacheCorruptedError, match=f"patch cache {out / 'patches.lmdb'} is damaged.*CorruptedError"
    ):
        PatchCache(out).slide_ids()
    release(out / "patches.lmdb")
    assert cache_main(["verify", str(out)]) == 1
    text = capsys.readouterr()
    assert f"DAMAGED LMDB {out / 'patches.lmdb'}" in text.out and "Traceback" not in text.err
    assert cache_main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    message, hint = err.splitlines()  # the dispatcher's one message + its --debug hint
    assert str(out / "patches.lmdb") in message and "--debug" in hint and "Traceback" not in err


# ------------------------------------------------------------------------------------------ slide paths


def test_source_paths_are_absolute_and_old_relative_ones_resolve(
    clean_cache: Path, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = PatchCache(clean_cache)
    slide_id = cache.slide_ids()[0]
    assert Path(cache.meta(slide_id)["source_path"]).is_absolute()
    # An old cache written next to the cohort with a path relative to the cohort folder, read from elsewhere.
    out = cohort.parent / "oldcache"
    shutil.copytree(clean_cache, out, dirs_exist_ok=True)
    release(out / "patches.lmdb")
    env = lmdb.open(str(out / "patches.lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        key = f"M/{slide_id}".encode()
        meta = json.loads(bytes(txn.get(key)))
        meta["source_path"] = f"slides/{slide_id}.svs"
        txn.put(key, json.dumps(meta).encode())
        txn.delete(f"H/{slide_id}".encode())  # old caches have no metadata checksum
    env.close()
    monkeypatch.chdir(tmp_path)
    resolved = Path(PatchCache(out).meta(slide_id)["source_path"])
    assert resolved.is_absolute() and resolved.is_file() and resolved.name == f"{slide_id}.svs"
    shutil.rmtree(out)


def test_format_1_caches_are_read_but_not_extended(
    clean_cache: Path, cohort: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "old"
    shutil.copytree(clean_cache, out)
    env = lmdb.open(str(out / "patches.lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"F/format", b'{"format_version": 1}')
        for key, value in list(txn.cursor()):
            if bytes(key).startswith(b"M/"):
                meta = json.loads(bytes(value))
                for info in meta["magnifications"].values():
                    del info["crc32"]
                txn.put(bytes(key), json.dumps(meta).encode())
                txn.delete(b"H/" + bytes(key)[2:])  # nor metadata checksums
    env.close()
    cache = PatchCache(out)
    slide_id = cache.slide_ids()[0]
    assert cache.get_many(slide_id, 20, [0, 1]).shape == (2, 256, 256, 3)
    assert cache_main(["verify", str(out)]) == 0
    assert "no checksums (cache format 1)" in capsys.readouterr().out
    release(out / "patches.lmdb")
    args = ["--manifest", str(cohort), "--out", str(out), "--magnifications", "20", "10", "--workers", "0"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cache format 1" in err and "new --out" in err and "Traceback" not in err


def test_preprocess_into_a_corrupted_cache_is_one_message(
    clean_cache: Path, cohort: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    data = out / "patches.lmdb" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[4096 * 2 : 4096 * 4] = b"\xa5" * 8192
    data.write_bytes(bytes(raw))
    args = ["--manifest", str(cohort), "--out", str(out), "--magnifications", "20", "10", "--workers", "0"]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    message, hint = err.splitlines()  # the dispatcher's one message + its --debug hint
    assert f"patch cache {out / 'patches.lmdb'} is damaged" in message and "--debug" in hint


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--min-coverage", "1.5"], "min coverage must be in [0, 1]"),
        (["--saturation-threshold", "high"], "--saturation_threshold must be 0-255 or 'otsu'"),
    ],
)
def test_bad_tiling_flags_are_usage_errors(
    tmp_path: Path, cohort: Path, capsys, flags: list[str], needle: str
) -> None:
    args = ["--manifest", str(cohort), "--out", str(tmp_path / "c"), "--magnifications", "20", *flags]
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_an_evaluation_bag_over_a_damaged_patch_names_it_or_skips_it(damaged_cache) -> None:
    from e2e_wsi.data.datasets import Bag, EvalBagDataset
    from e2e_wsi.data.transforms import EvalTransform

    out, slide_id, key = damaged_cache
    bags = [Bag(slide_id, (slide_id,), {"target": 0})]
    strict = EvalBagDataset(PatchCache(out), bags, [20.0], EvalTransform(64))
    with pytest.raises(DamagedPatchError, match=f"{key.decode()} of slide '{slide_id}'"):
        strict[0]
    lenient = EvalBagDataset(PatchCache(out, on_damaged="skip"), bags, [20.0], EvalTransform(64))
    with pytest.warns(RuntimeWarning, match="nearest intact"):
        item = lenient[0]
    assert item["images"].shape[0] == PatchCache(out).count(slide_id, 20)
