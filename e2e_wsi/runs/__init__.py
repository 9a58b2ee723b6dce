"""Runs: the one home of run folders, checkpoints and building models from them.

* :mod:`~e2e_wsi.runs.folder`: :class:`RunFolder` (every path of a run folder) and
  :class:`CrossvalFolder` (``fold_<k>`` run folders plus pooled results);
* :mod:`~e2e_wsi.runs.resolve`: which run folder a verb writes into and which checkpoint(s) it loads;
* :mod:`~e2e_wsi.runs.checkpoints`: safe loading (``torch.load(weights_only=True)`` plus a small
  allow-list; the only ``torch.load`` of the package) and the Lightning checkpoint key names;
* :mod:`~e2e_wsi.runs.allowlist`: the classes a config from a run folder may name, checked before
  anything is imported or instantiated;
* :mod:`~e2e_wsi.runs.loading`: a model (:func:`load_run` -> :class:`LoadedRun`) or an encoder
  (:func:`encoder_from_run`, :func:`build_encoder`) from a run;
* :mod:`~e2e_wsi.runs.preprocess`: ``RUN/preprocess.json``, the tiling of the training cache.

Names are imported lazily, so the torch-only :mod:`~e2e_wsi.runs.checkpoints` stays importable from the
packages below (the models' pretrained-weight loaders) without importing the models back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "RunFolder": "folder",
    "CrossvalFolder": "folder",
    "DEFAULT_RUN_DIR": "folder",
    "resolve_checkpoint": "resolve",
    "resolve_checkpoints": "resolve",
    "command_run_folder": "resolve",
    "UnsafeCheckpointError": "checkpoints",
    "load_checkpoint": "checkpoints",
    "verify_checkpoint": "checkpoints",
    "load_torch_file": "checkpoints",
    "is_remote": "checkpoints",
    "RefusedConfigError": "allowlist",
    "check_config": "allowlist",
    "LoadedRun": "loading",
    "load_run": "loading",
    "load_runs": "loading",
    "read_run_config": "loading",
    "build_encoder": "loading",
    "encoder_from_run": "loading",
    "record_preprocess_params": "preprocess",
    "preprocess_params": "preprocess",
}
__all__ = [
    "CrossvalFolder",
    "DEFAULT_RUN_DIR",
    "LoadedRun",
    "RefusedConfigError",
    "RunFolder",
    "UnsafeCheckpointError",
    "build_encoder",
    "check_config",
    "command_run_folder",
    "encoder_from_run",
    "is_remote",
    "load_checkpoint",
    "load_run",
    "load_runs",
    "load_torch_file",
    "preprocess_params",
    "read_run_config",
    "record_preprocess_params",
    "resolve_checkpoint",
    "resolve_checkpoints",
    "verify_checkpoint",
]

if TYPE_CHECKING:  # pragma: no cover
    from e2e_wsi.runs.allowlist import RefusedConfigError, check_config
    from e2e_wsi.runs.checkpoints import (
        UnsafeCheckpointError,
        is_remote,
        load_checkpoint,
        load_torch_file,
        verify_checkpoint,
    )
    from e2e_wsi.runs.folder import DEFAULT_RUN_DIR, CrossvalFolder, RunFolder
    from e2e_wsi.runs.loading import (
        LoadedRun,
        build_encoder,
        encoder_from_run,
        load_run,
        load_runs,
        read_run_config,
    )
    from e2e_wsi.runs.preprocess import preprocess_params, record_preprocess_params
    from e2e_wsi.runs.resolve import command_run_folder, resolve_checkpoint, resolve_checkpoints


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'e2e_wsi.runs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"e2e_wsi.runs.{module}"), name)
    globals()[name] = value
    return value
