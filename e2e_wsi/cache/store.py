"""The LMDB patch cache: key layout, the read-only :class:`PatchCache`, and the writer's commit.

Layout of one LMDB (``CACHE_DIR/patches.lmdb`` or one shard ``CACHE_DIR/shard-00-of-04.lmdb``):

* ``M/<slide_id>`` -> UTF-8 JSON metadata of the slide (see docs/architecture.md).
* ``P/<slide_id>/<mag:06d>/<index:09d>`` -> raw JPEG bytes of one patch; ``mag`` is the magnification
  times 100 (``001000`` for 10x, ``000250`` for 2.5x). The fields after the id are fixed width, so a
  slide's patches sort contiguously by magnification then index (fast random access within a slide).
* ``F/format`` -> JSON ``{"format_version": ...}``.

Nothing is pickled. The meta key is written in the same transaction as the slide's patches, so a slide
is either complete or absent.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lmdb
import numpy as np

from e2e_wsi.slides.tiling import decode_jpeg
from e2e_wsi.utils import validate_slide_id

FORMAT_VERSION = 1
LMDB_SUFFIX = ".lmdb"
_FORMAT_KEY = b"F/format"


def mag_key(magnification: float) -> str:
    """Canonical text of a magnification: ``mag_key(10.0) == "10"``, ``mag_key(2.5) == "2.5"``."""
    value = round(float(magnification), 4)
    if value <= 0:
        raise ValueError(f"magnification must be positive, got {magnification!r}")
    return f"{value:g}"


def meta_key(slide_id: str) -> bytes:
    """LMDB key of a slide's metadata."""
    return f"M/{validate_slide_id(slide_id)}".encode()


def patch_prefix(slide_id: str) -> bytes:
    """Common prefix of all patch keys of a slide."""
    return f"P/{validate_slide_id(slide_id)}/".encode()


def patch_key(slide_id: str, magnification: float, index: int) -> bytes:
    """LMDB key of one patch (fixed-width magnification and index fields)."""
    return patch_prefix(slide_id) + f"{round(float(magnification) * 100):06d}/{int(index):09d}".encode()


def find_lmdbs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve cache directories or ``.lmdb`` directories to the list of LMDB environments.

    Args:
        paths: A cache dir (all ``*.lmdb`` inside are shards), an ``.lmdb`` dir, or a list of them.

    Returns:
        Sorted LMDB directories.

    Raises:
        FileNotFoundError: If a path does not exist or holds no LMDB.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if (path / "data.mdb").is_file():
            found.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(
                f"patch cache {path} does not exist; run `e2e-wsi preprocess --out {path}` first"
            )
        shards = sorted(p for p in path.glob(f"*{LMDB_SUFFIX}") if (p / "data.mdb").is_file())
        if not shards:
            raise FileNotFoundError(
                f"no LMDB (*{LMDB_SUFFIX}) in {path}; is it a cache written by `e2e-wsi preprocess`?"
            )
        found.extend(shards)
    return found


def iter_meta(txn: lmdb.Transaction) -> Iterator[tuple[str, dict]]:
    """All ``(slide_id, metadata)`` pairs in one LMDB."""
    cursor = txn.cursor()
    if not cursor.set_range(b"M/"):
        return
    for key, value in cursor:
        if not bytes(key).startswith(b"M/"):
            break
        yield bytes(key)[2:].decode(), json.loads(bytes(value))


# One read-only handle per LMDB per process: py-lmdb refuses to open the same files twice in a process,
# and several PatchCache objects (train/val datasets) often share a cache. Handles inherited through
# fork must be closed in the child (closing there does not affect the parent) and opened afresh.
_SHARED: dict[Path, lmdb.Environment] = {}
_SHARED_PID = os.getpid()


def open_readonly(path: Path) -> lmdb.Environment:
    """This process's shared read-only handle of an LMDB (opened lazily, re-opened after fork).

    Opened with ``readonly=True, lock=False, readahead=False``: no lock file (readers never block the
    OS page cache with read-ahead of random patches) and safe for many DataLoader workers.
    """
    global _SHARED_PID
    if _SHARED_PID != os.getpid():
        for env in _SHARED.values():
            env.close()  # the parent's handle; only this process's copy is released
        _SHARED.clear()
        _SHARED_PID = os.getpid()
    key = Path(path).resolve()
    env = _SHARED.get(key)
    if env is None:
        env = lmdb.open(str(key), readonly=True, lock=False, readahead=False, max_readers=2048, subdir=True)
        _SHARED[key] = env
    return env


def release(path: Path) -> None:
    """Close this process's shared read handle of an LMDB (before writing to it); readers re-open lazily."""
    env = _SHARED.pop(Path(path).resolve(), None)
    if env is not None:
        env.close()


class PatchCache:
    """Read-only view of one or more patch LMDBs (shards) as one cache.

    Environments open lazily on first use and re-open in a new process (checked with ``os.getpid()``),
    so one instance can be built in the main process and used inside forked DataLoader workers. Pickling
    keeps only the paths, so spawned workers work too.

    Args:
        paths: A cache dir, an ``.lmdb`` dir, or a list of them.

    Raises:
        FileNotFoundError: If no LMDB is found.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path]) -> None:
        self.paths = find_lmdbs(paths)
        self._pid: int | None = None
        self._where: dict[str, int] = {}
        self._meta: dict[str, dict] = {}
        self._coords: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"])  # type: ignore[misc]

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        if not self._where:
            self._index()

    def _index(self) -> None:
        for i, path in enumerate(self.paths):
            with open_readonly(path).begin() as txn:
                for slide_id, meta in iter_meta(txn):
                    if slide_id in self._where:
                        other = self.paths[self._where[slide_id]]
                        raise ValueError(
                            f"slide {slide_id!r} is in two shards ({other} and {self.paths[i]}); "
                            "delete one of them (was the cache sharded twice with different --shard n?)"
                        )
                    self._where[slide_id] = i
                    self._meta[slide_id] = meta

    def _env(self, slide_id: str) -> lmdb.Environment:
        self._open()
        try:
            return open_readonly(self.paths[self._where[slide_id]])
        except KeyError:
            raise KeyError(
                f"slide {slide_id!r} is not in the patch cache {[str(p) for p in self.paths]}"
            ) from None

    def slide_ids(self) -> list[str]:
        """Sorted ids of all slides in the cache."""
        self._open()
        return sorted(self._where)

    def __contains__(self, slide_id: object) -> bool:
        self._open()
        return slide_id in self._where

    def __len__(self) -> int:
        return len(self.slide_ids())

    def meta(self, slide_id: str) -> dict:
        """The slide's JSON metadata (a dict; do not mutate)."""
        self._env(slide_id)
        return self._meta[slide_id]

    def magnifications(self, slide_id: str) -> list[float]:
        """Magnifications cached for the slide, ascending."""
        return sorted(float(m) for m in self.meta(slide_id)["magnifications"])

    def _mag(self, slide_id: str, magnification: float) -> dict:
        mags = self.meta(slide_id)["magnifications"]
        key = mag_key(magnification)
        if key not in mags:
            raise KeyError(f"slide {slide_id!r} has no patches at {key}x (cached: {sorted(mags, key=float)})")
        return mags[key]

    def count(self, slide_id: str, magnification: float) -> int:
        """Number of patches of the slide at a magnification."""
        return int(self._mag(slide_id, magnification)["count"])

    def coords(self, slide_id: str, magnification: float) -> np.ndarray:
        """Level-0 (x, y) of each patch's top-left corner, int64 [n, 2]."""
        key = (slide_id, mag_key(magnification))
        if key not in self._coords:
            coords = np.asarray(self._mag(slide_id, magnification)["coords"], dtype=np.int64).reshape(-1, 2)
            self._coords[key] = coords
        return self._coords[key]

    def _check_index(self, slide_id: str, magnification: float, index: int) -> bytes:
        n = self.count(slide_id, magnification)
        if not 0 <= int(index) < n:
            raise IndexError(
                f"patch index {index} out of range for slide {slide_id!r} at {mag_key(magnification)}x (n={n})"
            )
        return patch_key(slide_id, magnification, index)

    def get_bytes(self, slide_id: str, magnification: float, index: int) -> bytes:
        """Raw JPEG bytes of one patch."""
        key = self._check_index(slide_id, magnification, index)
        with self._env(slide_id).begin() as txn:
            value = txn.get(key)
        if value is None:
            raise KeyError(f"patch {key.decode()} missing from the cache (damaged LMDB?)")
        return bytes(value)

    def get(self, slide_id: str, magnification: float, index: int) -> np.ndarray:
        """One patch decoded, uint8 RGB [H, W, 3]."""
        return decode_jpeg(self.get_bytes(slide_id, magnification, index))

    def get_many(
        self, slide_id: str, magnification: float, indices: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Several patches decoded in one read transaction, uint8 [k, H, W, 3]."""
        keys = [self._check_index(slide_id, magnification, int(i)) for i in indices]
        if not keys:
            size = int(self.meta(slide_id)["patch_size"])
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        with self._env(slide_id).begin(buffers=True) as txn:
            arrays = []
            for key in keys:
                value = txn.get(key)
                if value is None:
                    raise KeyError(f"patch {key.decode()} missing from the cache (damaged LMDB?)")
                arrays.append(decode_jpeg(value))  # decode while the buffer is valid
        return np.stack(arrays)


# ---------------------------------------------------------------------------------------------- writer


def append_staged(handle: io.BufferedWriter, data: bytes) -> None:
    """Append one length-prefixed record to a staging file (worker side)."""
    handle.write(len(data).to_bytes(4, "little"))
    handle.write(data)


def read_staged(path: Path) -> Iterator[bytes]:
    """Records of a staging file, in the order they were appended."""
    with open(path, "rb") as handle:
        while header := handle.read(4):
            size = int.from_bytes(header, "little")
            data = handle.read(size)
            if len(header) != 4 or len(data) != size:
                raise OSError(f"staging file {path} is truncated")
            yield data


class CacheWriter:
    """The single writer of one LMDB: commits each slide in one transaction, growing the map as needed.

    Args:
        path: The ``.lmdb`` directory (created if missing).
        map_size: Initial map size in bytes; doubled on ``MapFullError``.
    """

    def __init__(self, path: Path, map_size: int = 1 << 30) -> None:
        self.path = Path(path)
        release(self.path)  # a reader handle in this process would block opening it for writing
        self.env = lmdb.open(str(self.path), map_size=map_size, subdir=True, readahead=False, meminit=False)
        with self.env.begin(write=True) as txn:
            raw = txn.get(_FORMAT_KEY)
            if raw is None:
                txn.put(_FORMAT_KEY, json.dumps({"format_version": FORMAT_VERSION}).encode())
            elif json.loads(bytes(raw)).get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{self.path} has cache format {json.loads(bytes(raw)).get('format_version')}, this version "
                    f"writes {FORMAT_VERSION}; use a new --out directory"
                )

    def all_meta(self) -> dict[str, dict]:
        """Metadata of every slide already committed."""
        with self.env.begin() as txn:
            return dict(iter_meta(txn))

    def commit_slide(self, meta: dict, patches: Callable[[], Iterator[tuple[float, int, bytes]]]) -> None:
        """Write a slide's patches and metadata in one transaction, replacing any previous version.

        Args:
            meta: The slide's JSON metadata (``slide_id`` key required).
            patches: Returns a fresh iterator of ``(magnification, index, jpeg)``; called again if the
                transaction has to be retried after growing the map.
        """
        slide_id = validate_slide_id(meta["slide_id"])
        payload = json.dumps(meta, separators=(",", ":")).encode()
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    self._delete_slide(txn, slide_id)
                    for magnification, index, data in patches():
                        txn.put(patch_key(slide_id, magnification, index), data)
                    txn.put(meta_key(slide_id), payload)
                return
            except lmdb.MapFullError:
                # The aborted transaction left nothing behind; retry the whole slide with a bigger map.
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    @staticmethod
    def _delete_slide(txn: lmdb.Transaction, slide_id: str) -> None:
        txn.delete(meta_key(slide_id))
        prefix = patch_prefix(slide_id)
        cursor = txn.cursor()
        if cursor.set_range(prefix):
            while bytes(cursor.key()).startswith(prefix):
                if not cursor.delete():
                    break

    def close(self) -> None:
        """Flush and close the environment."""
        self.env.sync()
        self.env.close()
