"""Which run folder a verb writes into and which checkpoint(s) it loads: decided here, once.

* :func:`resolve_checkpoint`: the one checkpoint of ``fit``/``validate``/``test``/``predict --config``
  (LightningCLI verbs), where ``last``/``best`` name files of the run folder;
* :func:`resolve_checkpoints`: the checkpoint(s) of ``predict --run/--ckpt``, ``heatmap`` and ``extract``
  (a run folder's best, every fold of a cross-validation folder, or explicit files);
* :func:`command_run_folder`: the run folder a LightningCLI verb writes into.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from e2e_wsi.errors import UserError
from e2e_wsi.runs.checkpoints import is_remote
from e2e_wsi.runs.folder import LIGHTNING_KEYWORDS, CrossvalFolder, RunFolder

# ckpt_path keywords that name a checkpoint file of the run folder.
RUN_KEYWORDS = ("last", "best")


def resolve_checkpoint(subcommand: str, ckpt_path: str | None, run: RunFolder) -> str | None:
    """The checkpoint file a LightningCLI verb will load (``None``: a fresh fit).

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


def resolve_checkpoints(run: str | Path | None, ckpts: Sequence[str | Path] | None = None) -> list[Path]:
    """The checkpoints of ``predict --run/--ckpt``, ``heatmap`` and ``extract``.

    Args:
        run: A run folder of ``fit`` (its best checkpoint) or a ``crossval`` folder (the best checkpoint
            of every fold); may be ``None`` when ``ckpts`` are given.
        ckpts: Explicit checkpoint files (or names inside ``RUN/checkpoints``); they win over ``run``.

    Returns:
        One or more checkpoint paths.

    Raises:
        FileNotFoundError: If a checkpoint is missing or the run folder holds none (says what to do).
        UserError: If neither is given.
    """
    if ckpts:
        base = RunFolder(run) if run else None
        out = []
        for c in ckpts:
            path = Path(c)
            if not path.is_file() and base is not None and base.checkpoint(str(c)).is_file():
                path = base.checkpoint(str(c))
            if not path.is_file():
                where = f" or a name in {base.checkpoints_dir}" if base is not None else ""
                raise FileNotFoundError(f"checkpoint {c} not found (give a .ckpt file{where})")
            out.append(path)
        return out
    if run is None:
        raise UserError("give a run folder (--run RUN) or checkpoint(s) (--ckpt FILE ...)")
    root = Path(run)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} not found")
    if CrossvalFolder.is_crossval_folder(root):
        return [fold.require_checkpoint() for fold in CrossvalFolder(root).folds()]
    return [RunFolder(root).require_checkpoint()]


def command_run_folder(
    run_dir: str | None, run_dir_typed: bool, configs: Sequence[str | Path], ckpt_path: str | None
) -> RunFolder:
    """The run folder a LightningCLI verb writes into.

    In order: ``--run_dir`` typed on the command line; the folder of a ``--config`` that lies in a run
    folder (so ``test --config COPY/config.yaml`` writes into COPY, never into the original run named
    inside the copied config); the run folder of ``--ckpt_path RUN/checkpoints/x.ckpt``; the ``run_dir``
    of the config; ``runs/default``.

    Args:
        run_dir: The parsed ``run_dir`` (typed or from a config).
        run_dir_typed: Whether ``--run_dir`` was typed on the command line.
        configs: The ``--config`` files, in the order given.
        ckpt_path: The checkpoint argument that counts (may be a Lightning keyword or a URL).
    """
    if run_dir_typed and run_dir:
        return RunFolder(run_dir)
    for config in reversed(list(configs)):
        folder = Path(config).parent
        if RunFolder.is_run_folder(folder):
            return RunFolder(folder)
    if ckpt_path and str(ckpt_path) not in LIGHTNING_KEYWORDS and not is_remote(ckpt_path):
        if RunFolder.holds_checkpoint(ckpt_path):
            return RunFolder.of_checkpoint(ckpt_path)
    return RunFolder.resolve(run_dir, None)
