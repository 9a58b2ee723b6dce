"""The LMDB patch cache: key layout, the read-only :class:`PatchCache`, and the writer's commit.

Layout of one LMDB (``CACHE_DIR/patches.lmdb`` or one shard ``CACHE_DIR/shard-00-of-04.lmdb``):

* ``M/<slide_id>`` -> UTF-8 JSON metadata of the slide (see docs/architecture.md).
* ``P/<slide_id>/<mag:06d>/<index:09d>`` -> raw JPEG bytes of one patch; ``mag`` is the magnification
  times 100 (``001000`` for 10x, ``000250`` for 2.5x). The fields after the id are fixed width, so a
  slide's patches sort contiguously by magnification then index (fast random access within a slide).
* ``H/<slide_id>`` -> JSON ``{"crc32": ...}``: the checksum of the bytes of ``M/<slide_id>`` (written with
  it since this version; entries without one are reported by ``cache verify`` as unchecked).
* ``F/format`` -> JSON ``{"format_version": ...}``.

Nothing is pickled. The meta key is written in the same transaction as the slide's patches, so a slide
is either complete or absent. Since format 2 the metadata holds the CRC32 of every patch's bytes
(``magnifications.<mag>.crc32``, a list in index order); reads check it, ``e2e-wsi cache verify`` checks
all of them. Format-1 caches (no checksums) are still read, without that check.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lmdb
import numpy as np

from e2e_wsi.errors import UserError
from e2e_wsi.slides.tiling import decode_jpeg
from e2e_wsi.utils import validate_slide_id

FORMAT_VERSION = 2  # 2: per-patch CRC32 in the metadata
LMDB_SUFFIX = ".lmdb"
_FORMAT_KEY = b"F/format"
OnDamaged = Literal["error", "skip"]
ON_DAMAGED: tuple[str, ...] = ("error", "skip")


class DamagedPatchError(UserError):
    """A cached patch whose bytes fail their checksum or cannot be decoded; names the slide and key."""


class CacheCorruptedError(UserError):
    """The LMDB itself is damaged (``lmdb.CorruptedError`` and kin); names the cache.

    A ``ValueError`` like every other bad-input error, so the CLIs print it as one message.
    """


def corrupted(path: str | Path, err: lmdb.Error) -> CacheCorruptedError:
    """One-line error for a damaged LMDB file, saying what to do."""
    return CacheCorruptedError(
        f"patch cache {path} is damaged ({type(err).__name__}: {' '.join(str(err).split())}); "
        f"run `e2e-wsi cache verify {Path(path).parent}` and re-run `e2e-wsi preprocess` into a new --out"
    )


# What the operating system says when a cache cannot be written (py-lmdb passes the text of errno on).
# LMDB reports a write cut short (a file-size limit, some full disks) as an input/output error.
_WRITE_FAILURES = (
    "No space left",
    "Disk quota",
    "File too large",
    "Permission denied",
    "Read-only file system",
    "Input/output error",
)


def write_failure(path: str | Path, err: BaseException) -> UserError | None:
    """A one-line :class:`UserError` when ``err`` means the disk is full or the folder not writable, else
    ``None`` (the caller then reports it as damage)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
    if not any(s in text for s in _WRITE_FAILURES):
        return None
    return UserError(
        f"cannot write the patch cache {path} ({text}: is the disk full, read-only or failing?): free disk "
        "space, or choose a writable --out, and re-run preprocess (slides already committed are kept and "
        "skipped)"
    )


def checksum(data: bytes | memoryview) -> int:
    """CRC32 of a stored value (zlib: fast, and enough to catch flipped bits)."""
    return zlib.crc32(data)


def mag_key(magnification: float) -> str:
    """Canonical text of a magnification: ``mag_key(10.0) == "10"``, ``mag_key(2.5) == "2.5"``."""
    value = round(float(magnification), 4)
    if value <= 0:
        raise ValueError(f"magnification must be positive, got {magnification!r}")
    return f"{value:g}"


def meta_key(slide_id: str) -> bytes:
    """LMDB key of a slide's metadata."""
    return f"M/{validate_slide_id(slide_id)}".encode()


def meta_sum_key(slide_id: str) -> bytes:
    """LMDB key of the checksum of a slide's metadata."""
    return f"H/{validate_slide_id(slide_id)}".encode()


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


def iter_raw_meta(txn: lmdb.Transaction) -> Iterator[tuple[str, bytes]]:
    """All ``(slide_id, metadata bytes)`` pairs in one LMDB, undecoded."""
    cursor = txn.cursor()
    if not cursor.set_range(b"M/"):
        return
    for key, value in cursor:
        if not bytes(key).startswith(b"M/"):
            break
        yield bytes(key)[2:].decode(errors="replace"), bytes(value)


def meta_damage(txn: lmdb.Transaction, slide_id: str, raw: bytes) -> tuple[dict | None, str | None]:
    """Decode a slide's metadata, checking it against its stored checksum.

    Returns:
        ``(metadata, None)`` when intact (also when no checksum was stored: older caches), else
        ``(None, why)``.
    """
    stored = txn.get(b"H/" + slide_id.encode())
    if stored is not None:
        try:
            crc = int(json.loads(bytes(stored))["crc32"])
        except (ValueError, KeyError, TypeError):
            return None, "its checksum entry is unreadable"
        if checksum(raw) != crc:
            return None, "metadata checksum mismatch"
    try:
        meta = json.loads(raw)
    except ValueError as err:
        return None, f"metadata is not valid JSON ({err})"
    if not isinstance(meta, dict) or not isinstance(meta.get("magnifications"), dict):
        return None, "metadata lacks its magnifications"
    return meta, None


def iter_meta(
    txn: lmdb.Transaction, path: str | Path = "", skip_damaged: bool = False
) -> Iterator[tuple[str, dict]]:
    """All ``(slide_id, metadata)`` pairs in one LMDB, each checked against its stored checksum.

    Args:
        txn: A read transaction of the LMDB.
        path: The LMDB, for messages.
        skip_damaged: Leave out slides whose metadata is damaged (the writer re-tiles them) instead of
            raising.

    Raises:
        CacheCorruptedError: Naming the slide and the cache, when a slide's metadata is damaged.
    """
    for slide_id, raw in iter_raw_meta(txn):
        meta, why = meta_damage(txn, slide_id, raw)
        if meta is not None:
            yield slide_id, meta
        elif not skip_damaged:
            raise CacheCorruptedError(
                f"the metadata of slide {slide_id!r} in patch cache {path} is damaged ({why}); run "
                f"`e2e-wsi cache verify {Path(path).parent}`, then re-run `e2e-wsi preprocess --overwrite` "
                "on that slide"
            )


# One read-only handle per LMDB per process: py-lmdb refuses to open the same files twice in a process,
# and several PatchCache objects (train/val datasets) often share a cache. Handles inherited through
# fork must be closed in the child (closing there does not affect the parent) and opened afresh.
_SHARED: dict[Path, lmdb.Environment] = {}
_LOST_WARNED: set[str] = set()
_log = logging.getLogger(__name__)
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
        on_damaged: What reading a damaged patch (checksum mismatch, undecodable JPEG) does: ``"error"``
            raises :class:`DamagedPatchError` naming the slide and key; ``"skip"`` warns once per patch
            and returns the nearest intact patch of the same slide in its place.

    Raises:
        FileNotFoundError: If no LMDB is found.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], on_damaged: OnDamaged = "error") -> None:
        if on_damaged not in ON_DAMAGED:
            raise ValueError(f"on_damaged must be one of {list(ON_DAMAGED)}, got {on_damaged!r}")
        self.paths = find_lmdbs(paths)
        self.on_damaged = on_damaged
        self._warned: set[bytes] = set()
        self._pid: int | None = None
        self._where: dict[str, int] = {}
        self._meta: dict[str, dict] = {}
        self._coords: dict[tuple[str, str], np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "on_damaged": self.on_damaged}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state.get("on_damaged", "error"))  # type: ignore[misc]

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        if not self._where:
            self._index()

    def _index(self) -> None:
        for i, path in enumerate(self.paths):
            try:
                with open_readonly(path).begin() as txn:
                    metas = list(iter_meta(txn, path))
            except lmdb.Error as err:
                raise corrupted(path, err) from None
            lost: list[str] = []
            for slide_id, meta in metas:
                if slide_id in self._where:
                    other = self.paths[self._where[slide_id]]
                    raise ValueError(
                        f"slide {slide_id!r} is in two shards ({other} and {self.paths[i]}); "
                        "delete one of them (was the cache sharded twice with different --shard n?)"
                    )
                source = meta.get("source_path") or ""
                if source and "://" not in source and not Path(source).is_absolute():  # URLs stay as they are
                    meta["source_path"], found = resolve_source_path(meta["source_path"], path)
                    lost += [] if found else [slide_id]
                self._where[slide_id] = i
                self._meta[slide_id] = meta
            if lost and str(path) not in _LOST_WARNED:
                # Old caches stored paths relative to where preprocess ran; say so once per LMDB.
                _LOST_WARNED.add(str(path))
                _log.warning(
                    "%d slide file(s) recorded in %s with a relative path were not found from here or near "
                    "the cache (e.g. %r); heatmaps of them will lack the slide image: run from the folder "
                    "preprocess ran in, or re-run preprocess (it stores absolute paths)",
                    len(lost),
                    path,
                    lost[0],
                )

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
        self._open()
        try:
            return self._meta[slide_id]
        except KeyError:
            raise KeyError(
                f"slide {slide_id!r} is not in the patch cache {[str(p) for p in self.paths]}"
            ) from None

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

    def _read(self, slide_id: str, magnification: float, indices: Sequence[int]) -> list[bytes | None]:
        """Raw values of patches in one read transaction; ``None`` where a value is missing."""
        n = self.count(slide_id, magnification)
        prefix = patch_key(slide_id, magnification, 0)[:-9]  # the fixed-width index is the last 9 bytes
        for index in indices:
            if not 0 <= index < n:
                raise IndexError(
                    f"patch index {index} out of range for slide {slide_id!r} at {mag_key(magnification)}x (n={n})"
                )
        env = self._env(slide_id)
        try:
            with env.begin() as txn:
                return [None if (v := txn.get(prefix + b"%09d" % i)) is None else bytes(v) for i in indices]
        except lmdb.Error as err:
            raise corrupted(self.paths[self._where[slide_id]], err) from None

    def _checksums(self, slide_id: str, magnification: float) -> list[int | None] | None:
        """Stored CRC32 of each patch, or ``None`` for a format-1 cache."""
        return self._mag(slide_id, magnification).get("crc32")

    def damage(self, slide_id: str, magnification: float, index: int, data: bytes | None) -> str | None:
        """Why a patch's stored bytes are damaged (missing, checksum mismatch), or ``None`` if intact.

        Format-1 caches have no checksums; their patches only fail here when missing (and on decoding
        when the JPEG is broken).
        """
        return _why_damaged(data, _crc_at(self._checksums(slide_id, magnification), index), decode=False)

    def _damaged(self, slide_id: str, magnification: float, index: int, why: str) -> DamagedPatchError:
        key = patch_key(slide_id, magnification, index).decode()
        return DamagedPatchError(
            f"patch {key} of slide {slide_id!r} in {self.paths[self._where[slide_id]]} is damaged ({why}); "
            "list all damaged patches with `e2e-wsi cache verify`, re-run preprocess with --overwrite on "
            "that slide, or set data.on_damaged: skip to read around them"
        )

    def get_bytes(self, slide_id: str, magnification: float, index: int) -> bytes:
        """Raw JPEG bytes of one patch, checked against its checksum.

        Raises:
            DamagedPatchError: If the bytes are missing or fail the checksum (whatever ``on_damaged``).
        """
        (data,) = self._read(slide_id, magnification, [int(index)])
        if (why := self.damage(slide_id, magnification, int(index), data)) is not None:
            raise self._damaged(slide_id, magnification, int(index), why)
        assert data is not None
        return data

    def get(self, slide_id: str, magnification: float, index: int) -> np.ndarray:
        """One patch decoded, uint8 RGB [H, W, 3] (damaged patches as in :meth:`get_many`)."""
        return self.get_many(slide_id, magnification, [index])[0]

    def get_many(
        self, slide_id: str, magnification: float, indices: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Several patches decoded in one read transaction, uint8 [k, H, W, 3].

        A damaged patch raises :class:`DamagedPatchError` (``on_damaged="error"``) or, with ``"skip"``,
        is replaced by the nearest intact patch of the slide at that magnification, with a warning.
        """
        indices = [int(i) for i in indices]
        if not indices:
            size = int(self.meta(slide_id)["patch_size"])
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        values = self._read(slide_id, magnification, indices)
        sums = self._checksums(slide_id, magnification)
        return np.stack(
            [self._decode(slide_id, magnification, i, v, sums) for i, v in zip(indices, values, strict=True)]
        )

    def _decode(
        self, slide_id: str, magnification: float, index: int, data: bytes | None, sums: list | None
    ) -> np.ndarray:
        why = _why_damaged(data, _crc_at(sums, index), decode=False)
        if why is None:
            try:
                return decode_jpeg(data)  # type: ignore[arg-type]
            except Exception as err:  # noqa: BLE001 - imagecodecs raises its own error types
                why = f"undecodable JPEG: {type(err).__name__}"
        if self.on_damaged == "error":
            raise self._damaged(slide_id, magnification, index, why)
        self._warn_skip(slide_id, magnification, index, why)
        return self._nearest_intact(slide_id, magnification, index)

    def _warn_skip(self, slide_id: str, magnification: float, index: int, why: str) -> None:
        key = patch_key(slide_id, magnification, index)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"patch {key.decode()} of slide {slide_id!r} is damaged ({why}); its nearest intact "
                "neighbour is used in its place (data.on_damaged: skip)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _nearest_intact(self, slide_id: str, magnification: float, index: int) -> np.ndarray:
        n = self.count(slide_id, magnification)
        for step in range(1, n):
            for other in (index - step, index + step):
                if not 0 <= other < n:
                    continue
                (data,) = self._read(slide_id, magnification, [other])
                if self.damage(slide_id, magnification, other, data) is None:
                    try:
                        return decode_jpeg(data)  # type: ignore[arg-type]
                    except Exception:  # noqa: BLE001, S112 - damaged too: look further
                        continue
        raise self._damaged(slide_id, magnification, index, "and no intact patch is left in the slide")


def resolve_source_path(source: str, lmdb_path: Path) -> tuple[str, bool]:
    """An absolute slide path from a cached ``source_path``, and whether that file exists.

    Caches written before format 2 stored the path as given to preprocess (often relative to the folder
    it ran in). Such a path is tried against the working directory, then the cache folder and its
    parents; the first that exists wins, else it is made absolute against the working directory.
    """
    path = Path(source)
    if path.is_absolute():
        return source, path.is_file()
    cache_dir = Path(lmdb_path).resolve().parent
    for base in (Path.cwd(), cache_dir, *list(cache_dir.parents)[:3]):
        if (base / path).is_file():
            return str((base / path).resolve()), True
    return str(Path.cwd() / path), False


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


def _meta_payload(meta: dict, sums: dict[str, dict[int, int]]) -> bytes:
    """The slide's metadata as JSON, with the checksum of each written patch added per magnification."""
    meta = {**meta, "format_version": FORMAT_VERSION, "magnifications": dict(meta["magnifications"])}
    for mag, info in meta["magnifications"].items():
        got = sums.get(mag, {})
        meta["magnifications"][mag] = {**info, "crc32": [got.get(i) for i in range(int(info["count"]))]}
    return json.dumps(meta, separators=(",", ":")).encode()


class CacheWriter:
    """The single writer of one LMDB: commits each slide in one transaction, growing the map as needed.

    Args:
        path: The ``.lmdb`` directory (created if missing).
        map_size: Initial map size in bytes; doubled on ``MapFullError``.
    """

    def __init__(self, path: Path, map_size: int = 1 << 30) -> None:
        self.path = Path(path)
        release(self.path)  # a reader handle in this process would block opening it for writing
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(self.path), map_size=map_size, subdir=True, readahead=False, meminit=False
            )
            with self.env.begin(write=True) as txn:
                raw = txn.get(_FORMAT_KEY)
                if raw is None:
                    txn.put(_FORMAT_KEY, json.dumps({"format_version": FORMAT_VERSION}).encode())
                    return
                old = json.loads(bytes(raw)).get("format_version")
        except (lmdb.Error, OSError) as err:
            raise write_failure(self.path, err) or corrupted(self.path, err) from None
        if old != FORMAT_VERSION:
            self.env.close()
            raise ValueError(
                f"{self.path} has cache format {old}, this version writes {FORMAT_VERSION} (with a checksum per "
                "patch); it can still read the old cache but not add to it: use a new --out directory"
            )

    def all_meta(self) -> dict[str, dict]:
        """Metadata of every slide already committed; slides with damaged metadata are left out (so
        they are tiled again and replaced)."""
        try:
            with self.env.begin() as txn:
                return dict(iter_meta(txn, self.path, skip_damaged=True))
        except lmdb.Error as err:
            raise corrupted(self.path, err) from None

    def commit_slide(self, meta: dict, patches: Callable[[], Iterator[tuple[float, int, bytes]]]) -> None:
        """Write a slide's patches and metadata in one transaction, replacing any previous version.

        Args:
            meta: The slide's JSON metadata (``slide_id`` key required).
            patches: Returns a fresh iterator of ``(magnification, index, jpeg)``; called again if the
                transaction has to be retried after growing the map.
        """
        slide_id = validate_slide_id(meta["slide_id"])
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    self._delete_slide(txn, slide_id)
                    sums: dict[str, dict[int, int]] = {}
                    for magnification, index, data in patches():
                        txn.put(patch_key(slide_id, magnification, index), data)
                        sums.setdefault(mag_key(magnification), {})[int(index)] = checksum(data)
                    payload = _meta_payload(meta, sums)
                    txn.put(meta_key(slide_id), payload)
                    txn.put(meta_sum_key(slide_id), json.dumps({"crc32": checksum(payload)}).encode())
                return
            except lmdb.MapFullError:
                # The aborted transaction left nothing behind; retry the whole slide with a bigger map.
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.Error as err:  # a full disk: the aborted transaction left nothing behind either
                raise write_failure(self.path, err) or corrupted(self.path, err) from None

    @staticmethod
    def _delete_slide(txn: lmdb.Transaction, slide_id: str) -> None:
        txn.delete(meta_key(slide_id))
        txn.delete(meta_sum_key(slide_id))
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


# ---------------------------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found.

    Attributes:
        patches: Patches checked.
        damaged: ``slide_id -> [(key, why), ...]`` of damaged patches and metadata (key ``M/<slide_id>``).
        unchecked: Slides without patch checksums (format-1 caches; only decoding could be checked).
        unchecked_meta: Slides whose metadata has no checksum (written before metadata checksums).
        corrupted: ``lmdb path -> message`` for LMDBs that could not be read at all.
    """

    patches: int = 0
    damaged: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)
    unchecked_meta: list[str] = field(default_factory=list)
    corrupted: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing is damaged."""
        return not self.damaged and not self.corrupted


def verify_cache(paths: str | Path | Sequence[str | Path], decode: bool = False) -> VerifyReport:
    """Check every patch of a cache against its checksum (and, with ``decode`` or no checksum, decode it).

    Args:
        paths: A cache dir, an ``.lmdb`` dir, or a list of them.
        decode: Also decode each JPEG (slower; catches a patch damaged before it was checksummed).

    Returns:
        The :class:`VerifyReport`.
    """
    report = VerifyReport()
    for path in find_lmdbs(paths):
        try:
            _verify_lmdb(path, report, decode)
        except lmdb.Error as err:
            report.corrupted[str(path)] = str(corrupted(path, err))
    return report


def _verify_lmdb(path: Path, report: VerifyReport, decode: bool) -> None:
    with open_readonly(path).begin(buffers=True) as txn:
        for slide_id, raw in list(iter_raw_meta(txn)):
            meta, why = meta_damage(txn, slide_id, raw)
            if meta is None:  # its patch list cannot be trusted either: only the metadata is reported
                report.damaged.setdefault(slide_id, []).append((f"M/{slide_id}", why))
                continue
            if txn.get(b"H/" + slide_id.encode()) is None:
                report.unchecked_meta.append(slide_id)
            for mag, info in meta["magnifications"].items():
                sums = info.get("crc32")
                if sums is None and slide_id not in report.unchecked:
                    report.unchecked.append(slide_id)
                for index in range(int(info["count"])):
                    key = patch_key(slide_id, float(mag), index)
                    value = txn.get(key)
                    report.patches += 1
                    why = _why_damaged(value, _crc_at(sums, index), decode or sums is None)
                    if why is not None:
                        report.damaged.setdefault(slide_id, []).append((key.decode(), why))


def _crc_at(sums: list[int | None] | None, index: int) -> int | None:
    return None if sums is None else sums[index]


def _why_damaged(value: bytes | memoryview | None, crc: int | None, decode: bool) -> str | None:
    if value is None:
        return "missing"
    if crc is not None and checksum(value) != int(crc):
        return "checksum mismatch"
    if decode:
        try:
            decode_jpeg(value)
        except Exception as err:  # noqa: BLE001 - imagecodecs raises its own error types
            return f"undecodable JPEG: {type(err).__name__}"
    return None
