"""Small helpers shared by several packages."""

from __future__ import annotations

import errno
import re

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
