"""Metadata checksums (issue 21 item 10): a changed coordinate in ``M/<slide>`` is found by ``cache verify``
and refused on reading, broken metadata JSON names the slide and the cache, and preprocess re-tiles a slide
whose metadata is damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lmdb
import pytest

from e2e_wsi.cache.cli import main as cache_main
from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.cache.store import CacheCorruptedError, PatchCache, release, verify_cache
from e2e_wsi.cache.worker import PreprocessConfig
from tests.helpers.cache import MAGS


def _edit(lmdb_path: Path, key: bytes, value: bytes | None) -> None:
    """Overwrite (or delete) one LMDB entry, as a disk error or a hand edit would."""
    release(lmdb_path)
    env = lmdb.open(str(lmdb_path), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key, value) if value is not None else txn.delete(key)
    env.close()


@pytest.fixture
def copy(clean_cache: Path, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "cache"
    shutil.copytree(clean_cache, out)
    return out, PatchCache(clean_cache).slide_ids()[0]


def test_a_changed_coordinate_is_found_and_refused(copy, capsys) -> None:
    cache, slide_id = copy
    lmdb_path = cache / "patches.lmdb"
    assert verify_cache(cache).ok and not verify_cache(cache).unchecked_meta
    meta = PatchCache(cache).meta(slide_id)
    meta["magnifications"]["20"]["coords"][0][0] += 64
    _edit(lmdb_path, f"M/{slide_id}".encode(), json.dumps(meta, separators=(",", ":")).encode())
    report = verify_cache(cache)
    assert not report.ok and report.damaged == {slide_id: [(f"M/{slide_id}", "metadata checksum mismatch")]}
    assert cache_main(["verify", str(cache)]) == 1
    assert f"slide {slide_id}: 1 damaged entry" in capsys.readouterr().out
    with pytest.raises(
        CacheCorruptedError, match=f"metadata of slide '{slide_id}' in patch cache .*patches.lmdb"
    ):
        PatchCache(cache).slide_ids()


def test_broken_metadata_json_names_the_slide_and_the_cache(copy) -> None:
    cache, slide_id = copy
    lmdb_path = cache / "patches.lmdb"
    _edit(lmdb_path, f"H/{slide_id}".encode(), None)  # as an older cache: no metadata checksum
    assert verify_cache(cache).unchecked_meta == [slide_id]
    _edit(lmdb_path, f"M/{slide_id}".encode(), b'{"slide_id": "x", "magnif')
    with pytest.raises(
        CacheCorruptedError, match=f"slide '{slide_id}' in patch cache {lmdb_path}.*not valid JSON"
    ):
        PatchCache(cache).slide_ids()
    assert "not valid JSON" in verify_cache(cache).damaged[slide_id][0][1]


def test_preprocess_retiles_a_slide_with_damaged_metadata(copy, cohort: Path) -> None:
    cache, slide_id = copy
    _edit(cache / "patches.lmdb", f"M/{slide_id}".encode(), b"{}")
    rows = preprocess(jobs_from_manifest(cohort), cache, PreprocessConfig(MAGS), workers=0, progress=False)
    assert {r["slide_id"]: r["cached"] for r in rows}[slide_id] is False
    assert sum(r["cached"] for r in rows) == len(rows) - 1
    assert verify_cache(cache).ok
