"""Reading a patch cache back byte by byte, for tests that compare two caches or a cache before/after."""

from __future__ import annotations

import hashlib
from pathlib import Path

from e2e_wsi.cache.store import open_readonly, release

MAGS = (20.0, 10.0)  # the cache tests' magnifications (their cohort is scanned at 20x)


def lmdb_contents(cache_dir: Path) -> dict[bytes, str]:
    """key -> sha1 of value, over every LMDB in a cache dir."""
    out: dict[bytes, str] = {}
    for path in sorted(cache_dir.glob("*.lmdb")):
        with open_readonly(path).begin() as txn:  # the process-wide handle PatchCache also uses
            for key, value in txn.cursor():
                out[bytes(key)] = hashlib.sha1(bytes(value)).hexdigest()
        release(path)
    return out
