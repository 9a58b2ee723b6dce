"""Checkpoints the tool may load, and how they are found.

Every checkpoint ``e2e-wsi`` reads goes through :func:`load_checkpoint`: ``torch.load(weights_only=True)``
with the small allow-list :data:`SAFE_GLOBALS`, so a checkpoint can hold tensors and plain containers but
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
containers of numbers, strings and tensors); ``tests/training/test_checkpoints.py`` checks that a real
checkpoint loads under the allow-list.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict

from e2e_wsi.errors import UserError
from e2e_wsi.training.run import RunFolder

# Non-tensor types a Lightning checkpoint may legitimately hold. AttributeDict is the dict subclass that
# Lightning uses for ``hyper_parameters`` of modules calling ``save_hyperparameters``.
SAFE_GLOBALS: list[Any] = [AttributeDict]

# Lightning's ckpt_path keywords that name a checkpoint of the run folder rather than a file.
RUN_KEYWORDS = ("last", "best")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class UnsafeCheckpointError(UserError):
    """A checkpoint the tool refuses to load (remote, or holding pickled objects)."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``http://``, ``s3://``, ...) rather than a local file."""
    return bool(_SCHEME.match(str(path)))


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
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
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'): pass a file from RUN/checkpoints/"
        )
    return ckpt


def load_torch_file(path: str | Path) -> Any:
    """Load any ``torch.save`` file safely (``weights_only=True`` plus :data:`SAFE_GLOBALS`).

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
        raise FileNotFoundError(f"checkpoint {file} not found (--ckpt_path)")
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
        raise ValueError(f"cannot read checkpoint {file}: {err}") from None
    return ckpt


def resolve_checkpoint(subcommand: str, ckpt_path: str | None, run: RunFolder) -> str | None:
    """The checkpoint file a verb will load (``None``: a fresh fit).

    ``fit``: no ``ckpt_path`` is a fresh run; ``last``/``best`` name the run folder's checkpoints and
    must exist (a resume that silently starts from scratch is refused). ``validate``/``test``/``predict``:
    no ``ckpt_path`` means the run's best checkpoint (:meth:`RunFolder.best_checkpoint`), and a run
    without checkpoints is refused (scoring random weights is never what the user wants). Other
    keywords (``hpc``, ``registry``) are left to Lightning, which then loads with ``weights_only=True``.

    Raises:
        FileNotFoundError: If the checkpoint the command needs does not exist.
    """
    if ckpt_path is None and subcommand == "fit":
        return None
    if ckpt_path is None or str(ckpt_path) in RUN_KEYWORDS:
        which = str(ckpt_path or "best")
        found = run.last_checkpoint() if which == "last" else run.best_checkpoint()
        if found is None:
            hint = (
                "start a fresh fit without --ckpt_path, or pass --ckpt_path FILE"
                if subcommand == "fit"
                else "pass --ckpt_path FILE, or train first with `e2e-wsi fit`"
            )
            raise FileNotFoundError(
                f"e2e-wsi {subcommand}: run folder {run.root} holds no {which} checkpoint "
                f"(looked in {run.checkpoints_dir}): {hint}"
            )
        return str(found)
    return str(ckpt_path)
