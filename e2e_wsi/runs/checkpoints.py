"""Safe loading of checkpoints and other ``torch.save`` files, and the Lightning checkpoint key names.

This is the only module that calls ``torch.load``. Every checkpoint ``e2e-wsi`` reads goes through
:func:`load_checkpoint`, every other ``torch.save`` file (pretrained encoder weights, official checkpoints
for ``convert``) through :func:`load_torch_file`: ``torch.load(weights_only=True)``
with the small allow-list :func:`safe_globals`, so a checkpoint can hold tensors and plain containers but
never a pickled object whose ``__reduce__`` runs code. Lightning 2.6 loads ``trainer.fit/test(ckpt_path=...)``
with ``weights_only=False`` unless told otherwise and fetches ``http(s)://`` checkpoints through
``torch.hub`` (again unpickling everything), so the CLI

* refuses remote checkpoints (any ``scheme://`` path). Download the file yourself (``curl -o x.ckpt URL``),
  check it, and pass the local path: a local file is one the user can checksum, and a URL can serve a
  different file to every DDP rank or on every run;
* validates each local checkpoint with :func:`load_checkpoint` before Lightning sees it, and refuses it
  with a clear :class:`UnsafeCheckpointError` when it holds anything outside the allow-list;
* passes ``weights_only=True`` to Lightning, so Lightning's own load is restricted as well.

Checkpoints written by ``e2e-wsi fit`` need no allow-listed type today (the module stores no
``hyper_parameters``; datamodule hyperparameters, loop, callback, optimizer and scheduler states are plain
containers of numbers, strings and tensors); ``tests/runs/test_checkpoint_safety.py`` checks that a real
checkpoint loads under the allow-list.

This module imports only torch (and Lightning's ``AttributeDict`` when it loads), so the packages below
``runs`` (the models' pretrained-weight loaders) use it without importing the rest of :mod:`e2e_wsi.runs`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from e2e_wsi.errors import UserError


def safe_globals() -> list[Any]:
    """Non-tensor types a Lightning checkpoint may legitimately hold.

    ``AttributeDict`` is the dict subclass Lightning uses for ``hyper_parameters`` of modules calling
    ``save_hyperparameters``. Imported here, not at module level, so loading pretrained weights does not
    import Lightning.
    """
    from lightning.fabric.utilities.data import AttributeDict

    return [AttributeDict]


# Keys of a Lightning checkpoint that e2e-wsi reads or writes, spelled once.
STATE_DICT = "state_dict"
EPOCH = "epoch"
GLOBAL_STEP = "global_step"
LIGHTNING_VERSION = "pytorch-lightning_version"
FEATURES = "e2e_wsi_features"  # feature (two-stage) runs: width and settings of the training features

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class UnsafeCheckpointError(UserError):
    """A checkpoint the tool refuses to load (remote, or holding pickled objects)."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``http://``, ``s3://``, ...) rather than a local file."""
    return bool(_SCHEME.match(str(path)))


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(safe_globals()):
        try:  # mmap: validating a large checkpoint should not read all of it into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (:func:`load_torch_file`, then a ``state_dict`` must be there).

    Args:
        path: A local checkpoint file.

    Returns:
        The checkpoint dict (tensors on the CPU).

    Raises:
        UnsafeCheckpointError: If ``path`` is a URL, or the file holds objects outside the allow-list
            (loading it would run code from the file).
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a readable Lightning checkpoint.
    """
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or STATE_DICT not in ckpt:
        raise UserError(
            f"{path} is not a Lightning checkpoint (no {STATE_DICT!r}): pass a file from RUN/checkpoints/"
        )
    return ckpt


_VERIFIED: set[tuple[str, int, int]] = set()


def verify_checkpoint(path: str | Path) -> None:
    """Check that ``path`` loads with :func:`load_checkpoint`, once per file version (path, mtime, size).

    The LightningCLI verbs call it before Lightning reads the file (Lightning reads it more than once).

    Raises:
        UnsafeCheckpointError: If the checkpoint is remote or holds pickled objects.
        FileNotFoundError: If the file does not exist.
    """
    file = Path(path)
    stat = file.stat() if file.is_file() else None
    key = (str(file.resolve()), *((stat.st_mtime_ns, stat.st_size) if stat else (0, 0)))
    if key not in _VERIFIED:
        load_checkpoint(path)
        _VERIFIED.add(key)


def state_dict_of(obj: Any) -> Any:
    """The weights inside what :func:`load_torch_file` returned: a checkpoint's ``state_dict``, else ``obj``.

    Pretrained-weight files are either a bare state dict or a dict with a ``state_dict`` entry (a
    Lightning checkpoint saved tensor-only).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get(STATE_DICT), Mapping):
        return obj[STATE_DICT]
    return obj


def checkpoint_payload(state_dict: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    """A minimal Lightning checkpoint around ``state_dict`` (epoch and step 0) that every verb loads.

    Args:
        state_dict: The module's weights.
        **extra: More top-level entries (plain data only), e.g. ``converted_from``.
    """
    import lightning

    return {
        STATE_DICT: state_dict,
        LIGHTNING_VERSION: lightning.__version__,
        EPOCH: 0,
        GLOBAL_STEP: 0,
        **extra,
    }


def load_torch_file(path: str | Path) -> Any:
    """Load any ``torch.save`` file safely (``weights_only=True`` plus :func:`safe_globals`).

    Raises:
        UnsafeCheckpointError: If ``path`` is a URL, or the file holds objects outside the allow-list.
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read.
    """
    if is_remote(path):
        raise UnsafeCheckpointError(
            f"refusing remote checkpoint {path}: download it first (e.g. `curl -L -o model.ckpt URL`), "
            "check where it came from, and pass the local file to --ckpt_path"
        )
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} not found")
    try:
        ckpt = _torch_load(file)
    except pickle.UnpicklingError as err:
        reason = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), "")
        raise UnsafeCheckpointError(
            f"refusing checkpoint {file}: it holds pickled objects that only load with "
            f"torch.load(weights_only=False), which can run code from the file ({reason or 'not plain data'}). "
            "Use checkpoints written by `e2e-wsi fit`; if you trust this file, re-save its state_dict with "
            "torch.save in a trusted session"
        ) from None
    except (RuntimeError, EOFError, KeyError, OSError) as err:
        raise UserError(f"cannot read checkpoint {file}: {err}") from None
    return ckpt
