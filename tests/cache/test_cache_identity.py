"""Stale patches (issue 21 item 5): a cached slide records its file's identity (size, mtime, sampled
SHA-256); a different file under the same id, or a slide replaced in place, is never served the old
patches: preprocess refuses it (re-tiles with --overwrite) and predict re-tiles it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from e2e_wsi.cache.identity import FULL_HASH_LIMIT, file_identity, identity_change
from e2e_wsi.cache.preprocess import preprocess
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cache.worker import PreprocessConfig, SlideJob
from e2e_wsi.errors import UserError
from tests.helpers.slides import make_tissue_slide

CONFIG = PreprocessConfig((5.0,), patch_size=64)


@pytest.fixture(scope="module")
def two_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different slides, both called S1.svs, in two folders."""
    root = tmp_path_factory.mktemp("ident")
    (root / "a").mkdir()
    (root / "b").mkdir()
    a = make_tissue_slide(root / "a" / "S1.svs", size=1024, seed=0).path
    b = make_tissue_slide(root / "b" / "S1.svs", size=1024, seed=3).path
    return a, b


def _run(path: Path, out: Path, **kw) -> dict:
    (row,) = preprocess([SlideJob("S1", path)], out, CONFIG, workers=0, qc=False, progress=False, **kw)
    return row


def test_a_different_file_with_the_same_id_is_refused_then_retiled(two_files, tmp_path: Path) -> None:
    a, b = two_files
    out = tmp_path / "cache"
    assert _run(a, out)["cached"] is False
    assert _run(a, out)["cached"] is True  # same file: resumed, not re-tiled
    with pytest.raises(UserError, match=r"different file.*S1 \(size.*--overwrite"):
        _run(b, out)
    assert PatchCache(out).meta("S1")["source_identity"] == file_identity(a)  # nothing lost
    assert _run(b, out, overwrite=True)["cached"] is False
    assert PatchCache(out).meta("S1")["source_identity"] == file_identity(b)


def test_a_slide_replaced_in_place_is_retiled(two_files, tmp_path: Path) -> None:
    a, b = two_files
    path = tmp_path / "slides" / "S1.svs"
    path.parent.mkdir()
    shutil.copy2(a, path)  # keeps the modification time: the same identity as `a`
    out = tmp_path / "cache"
    _run(path, out)
    shutil.copy(b, path)  # same path, new content
    with pytest.raises(UserError, match="S1"):
        _run(path, out)
    meta = PatchCache(out).meta("S1")
    assert identity_change(meta, path) is not None and identity_change(meta, a) is None


def test_identity_samples_large_files_and_sees_each_change(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = bytearray(os.urandom(FULL_HASH_LIMIT + 4096))
    big.write_bytes(data)
    meta = {"source_identity": file_identity(big)}
    assert meta["source_identity"]["hashed"] == "sample" and identity_change(meta, big) is None
    data[len(data) // 2] ^= 0xFF  # a byte in the middle window, same size
    big.write_bytes(data)
    os.utime(big, ns=(meta["source_identity"]["mtime_ns"],) * 2)  # even with the old mtime
    assert identity_change(meta, big) == "content changed"
    os.utime(big)
    data[len(data) // 2] ^= 0xFF  # back to the recorded bytes but touched
    big.write_bytes(data)
    assert identity_change(meta, big) == "modification time changed"
    # Entries of older caches carry no identity: judged by their path, as before.
    assert identity_change({"source_path": str(big)}, big) is None
    assert "another file" in identity_change({"source_path": str(tmp_path / "x.svs")}, big)
    assert json.dumps(file_identity(big))  # JSON-ready


def test_folders_and_urls_have_an_identity(tmp_path: Path) -> None:
    series = tmp_path / "series"  # a DICOM folder slide
    series.mkdir()
    (series / "a.dcm").write_bytes(b"x" * 100)
    meta = {"source_identity": file_identity(series)}
    assert meta["source_identity"]["hashed"] == "listing" and identity_change(meta, series) is None
    (series / "b.dcm").write_bytes(b"y")
    assert identity_change(meta, series) == "size 100 -> 101 bytes"
    url = {"source_identity": file_identity("s3://bucket/S1.svs")}
    assert identity_change(url, "s3://bucket/S1.svs") is None
    assert "another URL" in identity_change(url, "s3://other/S1.svs")
    assert "URL now" in identity_change(meta, "s3://bucket/S1.svs")
