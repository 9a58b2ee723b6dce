"""The preprocessing parameters of a patch cache, as recorded for a run (``RUN/preprocess.json``).

Every slide of a training cache shares its tiling parameters; ``fit`` records them next to the run so
``predict`` tiles new slides the same way (:mod:`e2e_wsi.inference.params` reads them back).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from e2e_wsi.cache.store import PatchCache


def cache_params(cache_dir: str | list[str]) -> dict[str, Any]:
    """The ``params`` of a training cache's first slide (every slide of a run shares them).

    Raises:
        ValueError: If the cache holds no slide.
    """
    cache = PatchCache(cache_dir)
    ids = cache.slide_ids()
    if not ids:
        raise ValueError(f"patch cache {cache_dir} holds no slide")
    return dict(cache.meta(ids[0])["params"])


def record_preprocess_params(path: Path, cache_dir: str | list[str]) -> Path | None:
    """Write ``path`` (``RUN/preprocess.json``) from the training cache (atomic; skipped if the cache is
    unreadable). Here, below ``training``, so ``fit`` records it without importing ``inference``."""
    try:
        params = cache_params(cache_dir)
    except (ValueError, OSError, KeyError):
        return None  # the datamodule reports a bad cache with a better message
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"cache_dir": cache_dir, "params": params}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
