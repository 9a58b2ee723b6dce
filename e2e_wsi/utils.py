"""Small helpers shared by several packages."""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# errno values that mean "the disk (or a quota, or a file-size limit) has no room": the user must free
# space; every later write would fail alike, so commands stop with one message instead of going on.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

_SLIDE_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}")


def validate_slide_id(slide_id: object, what: str = "slide id") -> str:
    """Check that a slide id is a safe key (never used as a path).

    Args:
        slide_id: The id from a manifest, a file name or a CLI argument.
        what: What the id is, for the message (``case_id`` follows the same rule: survival bags and
            prediction rows are named by it).

    Returns:
        The id, unchanged.

    Raises:
        ValueError: If the id is empty, too long, or holds anything but letters, digits, ``.``, ``_``
            and ``-`` (so no path separators, no ``..``, no leading dot).
    """
    text = str(slide_id)
    if not _SLIDE_ID.fullmatch(text) or ".." in text:
        raise ValueError(
            f"invalid {what} {text!r}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.' "
            "and without '..' (ids are cache keys, never file paths)"
        )
    return text


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (weights provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def describe_difference(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str:
    """Human-readable difference between two settings records (``None`` = unknown provenance)."""
    if a is None or b is None:
        return "one has e2e-wsi provenance, the other none (made by another tool)"
    fa, fb = _flatten(a), _flatten(b)
    diffs = [
        f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)
    ]
    return "; ".join(diffs[:6]) + (f"; +{len(diffs) - 6} more" if len(diffs) > 6 else "")


def grid_step(coords: np.ndarray) -> int | None:
    """Smallest positive spacing of [N, 2] patch coordinates along x or y (the tiling stride), if any."""
    steps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
    positive = np.concatenate(steps)
    positive = positive[positive > 0]
    return int(positive.min()) if positive.size else None
