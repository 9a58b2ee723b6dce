"""Tests of the PatchCache reader, key layout and writer."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest

from e2e_wsi.cache.store import CacheWriter, PatchCache, mag_key, patch_key


def test_mag_key_and_fixed_width_patch_keys() -> None:
    assert mag_key(10.0) == "10" and mag_key(2.5) == "2.5" and mag_key(20) == "20"
    with pytest.raises(ValueError):
        mag_key(0)
    keys = [patch_key("s1", m, i) for m in (2.5, 10.0, 40.0) for i in (0, 7, 123456)]
    assert len({len(k) for k in keys}) == 1  # same width whatever the magnification / index
    assert keys == sorted(keys)  # byte order = (magnification, index) order
    with pytest.raises(ValueError, match="invalid slide id"):
        patch_key("../x", 10, 0)


def test_reader_api(clean_cache: Path) -> None:
    cache = PatchCache(clean_cache)
    slide_id = cache.slide_ids()[0]
    assert cache.magnifications(slide_id) == [10.0, 20.0]
    n = cache.count(slide_id, 10)
    coords = cache.coords(slide_id, 10)
    assert coords.shape == (n, 2) and coords.dtype == np.int64
    batch = cache.get_many(slide_id, 10, [0, n - 1])
    assert batch.shape == (2, 256, 256, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[1], cache.get(slide_id, 10, n - 1))
    assert cache.get_bytes(slide_id, 10, 0)[:2] == b"\xff\xd8"
    with pytest.raises(IndexError):
        cache.get(slide_id, 10, n)
    with pytest.raises(KeyError, match="no patches at 5x"):
        cache.count(slide_id, 5)
    with pytest.raises(KeyError, match="not in the patch cache"):
        cache.meta("absent")
    meta = cache.meta(slide_id)
    for key in (
        "format_version",
        "slide_id",
        "source_path",
        "mpp",
        "objective_power",
        "dimensions",
        "patch_size",
        "magnifications",
        "tissue_fraction",
        "params",
    ):
        assert key in meta


def _child_read(cache: PatchCache, slide_id: str, queue) -> None:  # noqa: ANN001
    queue.put(cache.get_bytes(slide_id, 20, 3))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_safe_across_processes(clean_cache: Path, method: str) -> None:
    cache = PatchCache(clean_cache)
    slide_id = cache.slide_ids()[-1]
    expected = cache.get_bytes(slide_id, 20, 3)  # opened in the parent before the child exists
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_child_read, args=(cache, slide_id, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == expected
    assert cache.get_bytes(slide_id, 20, 3) == expected  # parent still fine
    assert pickle.loads(pickle.dumps(cache)).paths == cache.paths  # only paths travel


def test_shard_list_and_duplicate_slides(clean_cache: Path, tmp_path: Path) -> None:
    assert PatchCache([clean_cache / "patches.lmdb"]).slide_ids() == PatchCache(clean_cache).slide_ids()
    # The same slide committed into a second LMDB: ambiguous, so an error naming both.
    src = PatchCache(clean_cache)
    slide_id = src.slide_ids()[0]
    writer = CacheWriter(tmp_path / "other.lmdb")
    writer.commit_slide(src.meta(slide_id), lambda: iter(()))
    writer.close()
    with pytest.raises(ValueError, match="in two shards"):
        PatchCache([clean_cache, tmp_path / "other.lmdb"]).slide_ids()
    with pytest.raises(FileNotFoundError, match="preprocess"):
        PatchCache(tmp_path / "nothing")
