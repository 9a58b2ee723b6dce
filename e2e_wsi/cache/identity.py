"""The identity of a slide file, recorded in the cache so patches are never reused for another file.

Two files can share a slide id (``S1.svs`` in two folders) and a slide can be replaced in place; the id
and the tiling parameters alone cannot tell. Each cached slide therefore records its file's size,
modification time and a SHA-256 of a bounded sample of its bytes (the whole file when it is small, else
three 1 MiB windows: start, middle and end, which hold the header, tile offsets and image data).
Hashing reads at most 3 MiB per slide, so checking a cohort of multi-gigabyte slides stays cheap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

SAMPLE_WINDOW = 1 << 20  # bytes per sampled window
FULL_HASH_LIMIT = 3 * SAMPLE_WINDOW  # files up to this size are hashed whole


def file_identity(path: str | Path) -> dict[str, Any]:
    """Size, modification time (ns) and content hash of a slide, as JSON-ready values.

    Args:
        path: The slide file (for a multi-file format such as ``.mrxs``, its index file), a folder (a
            DICOM series: its files' names, sizes and times are hashed), or a URL (only the URL is
            recorded: a remote file's content cannot be checked cheaply).

    Returns:
        ``{"size", "mtime_ns", "sha256", "hashed"}``; ``hashed`` is ``"full"``, ``"sample"`` or
        ``"listing"`` (a folder); ``{"url"}`` for a URL.

    Raises:
        OSError: If the file cannot be read.
    """
    from e2e_wsi.slides.backends.base import is_url  # the slide layer's one test of "remote"

    if is_url(path):
        return {"url": str(path)}
    path = Path(path)
    if path.is_dir():
        return _folder_identity(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if stat.st_size <= FULL_HASH_LIMIT:
            digest.update(handle.read())
        else:
            for offset in (0, (stat.st_size - SAMPLE_WINDOW) // 2, stat.st_size - SAMPLE_WINDOW):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_WINDOW))
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest.hexdigest(),
        "hashed": "full" if stat.st_size <= FULL_HASH_LIMIT else "sample",
    }


def _folder_identity(folder: Path) -> dict[str, Any]:
    """A folder slide (DICOM): total size, newest time, and a hash of every file's name, size and time."""
    digest = hashlib.sha256()
    size, newest = 0, 0
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        size, newest = size + stat.st_size, max(newest, stat.st_mtime_ns)
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"size": size, "mtime_ns": newest, "sha256": digest.hexdigest(), "hashed": "listing"}


def identity_change(meta: dict[str, Any], path: str | Path) -> str | None:
    """Why the file at ``path`` is not the file a cached slide was tiled from, or ``None`` if it is.

    Args:
        meta: The slide's cache metadata (``source_identity``, and ``source_path`` for old entries).
        path: The slide file the caller is about to use.

    Returns:
        A short reason (``"size 123 -> 456 bytes"``, ``"content changed"``...), or ``None`` when the
        same. An entry written before identities were recorded is judged by its path alone (as before).
    """
    recorded = meta.get("source_identity")
    if recorded and "url" in recorded:
        return None if recorded["url"] == str(path) else f"tiled from another URL ({recorded['url']})"
    if not recorded:
        source = meta.get("source_path")
        same = source is not None and str(source) == str(path)
        if not same and source is not None and "://" not in str(source) + str(path):
            same = Path(source).resolve() == Path(path).resolve()
        return None if same else f"tiled from another file ({source})"
    try:
        current = file_identity(path)
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    if "url" in current:
        return "tiled from a local file, given a URL now"
    if current["size"] != recorded.get("size"):
        return f"size {recorded.get('size')} -> {current['size']} bytes"
    if current["sha256"] != recorded.get("sha256"):
        return "content changed"
    if current["mtime_ns"] != recorded.get("mtime_ns"):
        # Same size and sampled bytes but written since: a same-size edit between the sampled windows
        # cannot be excluded, so the entry is not trusted.
        return "modification time changed"
    return None
