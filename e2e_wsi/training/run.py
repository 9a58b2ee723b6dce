"""The run folder: the one place that knows where a run's files live.

A run folder (``--run_dir``) holds everything ``fit`` and later verbs write::

    RUN/config.yaml            resolved config of ``fit`` (``config.<stage>.yaml`` for other verbs)
    RUN/splits.csv             the split used for training (reused by every later verb)
    RUN/checkpoints/*.ckpt     ``best-*.ckpt`` (selected on validation) and ``last.ckpt`` (resume)
    RUN/predictions.csv        per-slide test predictions (owned by :mod:`e2e_wsi.evaluation.report`)
    RUN/metrics.json|.md       the bootstrap test report (owned by :mod:`e2e_wsi.evaluation.report`)
    RUN/predict/               ``predict``: predictions.csv and attention/<slide_id>.pt
    RUN/heatmaps/              attention heatmaps
    RUN/preprocess.json        the training cache's preprocessing parameters (tiles new slides alike)

Every module that needs one of these paths asks :class:`RunFolder` instead of joining names itself.
A cross-validation folder (``e2e-wsi crossval``, :mod:`e2e_wsi.training.crossval`) holds one run folder
per fold, ``DIR/fold_<k>``, plus ``summary.json|.md`` and ``oof_predictions.csv``.
"""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.cache.lock import FolderLock

DEFAULT_RUN_DIR = "runs/default"
_LAST = "last.ckpt"


class RunFolder:
    """Paths of one run folder (nothing is created or read on construction).

    Args:
        root: The run folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # ------------------------------------------------------------------------------------ locations
    @property
    def config(self) -> Path:
        """``config.yaml`` written by ``fit``."""
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        """``splits.csv``: the split of this run."""
        return self.root / "splits.csv"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def heatmaps_dir(self) -> Path:
        return self.root / "heatmaps"

    @property
    def metrics(self) -> Path:
        """``metrics.json``: the bootstrap report of ``test``."""
        return self.root / "metrics.json"

    @property
    def preprocess(self) -> Path:
        """``preprocess.json``: the preprocessing parameters of the training cache (written by ``fit``)."""
        return self.root / "preprocess.json"

    @property
    def predict_dir(self) -> Path:
        """``predict/``: ``predictions.csv`` and ``attention/<slide_id>.pt`` written by ``predict``."""
        return self.root / "predict"

    @property
    def predictions(self) -> Path:
        """``predictions.csv`` of ``test``."""
        return self.root / "predictions.csv"

    def fit_lock(self) -> FolderLock:
        """The lock ``fit`` holds on this folder while it trains (``RUN/.fit.lock``), so a second ``fit``
        into the same ``--run_dir`` is refused, naming the holder, instead of mixing checkpoints."""
        return FolderLock(
            self.root / ".fit.lock",
            what=f"run folder {self.root}",
            holder="another `e2e-wsi fit`",
            advice="use another --run_dir",
        )

    # ---------------------------------------------------------------------------------- checkpoints
    def last_checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt`` when it exists (the state after the latest epoch)."""
        path = self.checkpoints_dir / _LAST
        return path if path.is_file() else None

    def best_checkpoints(self) -> list[Path]:
        """Checkpoints selected on validation (every ``*.ckpt`` but ``last.ckpt``), oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob("*.ckpt") if p.name != _LAST and p.is_file()]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def best_checkpoint(self) -> Path | None:
        """The checkpoint to evaluate: the newest selected one, else ``last.ckpt``, else ``None``.

        With ``save_top_k: 1`` (every shipped config) there is exactly one selected checkpoint.
        """
        best = self.best_checkpoints()
        return best[-1] if best else self.last_checkpoint()

    def require_checkpoint(self) -> Path:
        """Like :meth:`best_checkpoint` but a missing checkpoint is an error that says what to do.

        Raises:
            FileNotFoundError: If the run holds no checkpoint.
        """
        ckpt = self.best_checkpoint()
        if ckpt is None:
            raise FileNotFoundError(
                f"run folder {self.root} holds no checkpoint (looked in {self.checkpoints_dir}): "
                "train it with `e2e-wsi fit --run_dir ...`, or pass --ckpt_path"
            )
        return ckpt

    # -------------------------------------------------------------------------------- construction
    @staticmethod
    def is_run_folder(folder: str | Path) -> bool:
        """Whether ``folder`` holds a run (its ``splits.csv`` or ``checkpoints/``), not just a config."""
        folder = Path(folder)
        return (folder / "splits.csv").is_file() or (folder / "checkpoints").is_dir()

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> RunFolder:
        """``RUN/checkpoints/x.ckpt`` -> ``RUN``; a checkpoint anywhere else -> its own folder."""
        ckpt = Path(ckpt_path)
        return cls(ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)

    @classmethod
    def resolve(cls, run_dir: str | Path | None = None, ckpt_path: str | Path | None = None) -> RunFolder:
        """The run folder of a command: explicit, else the checkpoint's, else ``runs/default``.

        ``ckpt_path`` values ``last``/``best``/``hpc`` are Lightning keywords, not files.
        """
        if run_dir:
            return cls(run_dir)
        if ckpt_path and str(ckpt_path) not in {"last", "best", "hpc"}:
            ckpt = Path(ckpt_path)
            if ckpt.parent.name == "checkpoints":
                return cls(ckpt.parent.parent)
        return cls(DEFAULT_RUN_DIR)
