"""``RUN/preprocess.json``: the preprocessing a run was trained with, so new slides are tiled alike.

This module owns the file's format: ``{"cache_dir": <training cache>, "params": <the cache's per-slide
params>}`` (:mod:`e2e_wsi.cache.store` metadata). ``fit`` records it through
:func:`record_preprocess_params`; runs trained before it existed are read lazily from the training cache
named in their ``config.yaml``. Turning the params into a :class:`~e2e_wsi.cache.worker.PreprocessConfig`
for new slides is :mod:`e2e_wsi.inference.params`' job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.runs.folder import RunFolder


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


def record_preprocess_params(run: RunFolder, cache_dir: str | list[str]) -> Path | None:
    """Write ``RUN/preprocess.json`` from the training cache (atomic; skipped if the cache is unreadable)."""
    try:
        params = cache_params(cache_dir)
    except (ValueError, OSError, KeyError):
        return None  # the datamodule reports a bad cache with a better message
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = run.preprocess.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"cache_dir": cache_dir, "params": params}, indent=2) + "\n")
    os.replace(tmp, run.preprocess)
    return run.preprocess


def preprocess_params(run: RunFolder, data_cfg: dict) -> dict[str, Any]:
    """The run's preprocessing parameters: ``RUN/preprocess.json``, else its training cache's.

    Args:
        run: The run folder.
        data_cfg: The ``data`` section of the run's config (names the training cache).

    Raises:
        FileNotFoundError: If neither is available (the message says what to do).
    """
    if run.preprocess.is_file():
        return dict(json.loads(run.preprocess.read_text())["params"])
    cache_dir = data_cfg.get("cache_dir")
    try:
        return cache_params(cache_dir)
    except (ValueError, OSError, KeyError, TypeError):
        raise FileNotFoundError(
            f"run folder {run.root} has no preprocess.json and its training cache {cache_dir!r} is not "
            "readable: copy the cache back, or write preprocess.json from the cache's summary.json params"
        ) from None
