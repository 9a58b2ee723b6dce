"""The run folder and the cross-validation folder: the one place that knows where a run's files live.

A run folder (``--run_dir``) holds everything ``fit`` and later verbs write::

    RUN/config.yaml            resolved config of ``fit`` (``config.<stage>.yaml`` for other verbs)
    RUN/splits.csv             the split used for training (reused by every later verb)
    RUN/checkpoints/*.ckpt     ``best-*.ckpt`` (selected on validation) and ``last.ckpt`` (resume)
    RUN/predictions.csv        per-slide test predictions (owned by :mod:`e2e_wsi.evaluation.report`)
    RUN/metrics.json|.md       the bootstrap test report (owned by :mod:`e2e_wsi.evaluation.report`)
    RUN/<stage>_metrics.json   the epoch metrics of ``validate``
    RUN/predict/               ``predict``: predictions.csv and attention/<slide_id>.pt
    RUN/heatmaps/              attention heatmaps
    RUN/preprocess.json        the training cache's preprocessing parameters (:mod:`e2e_wsi.runs.preprocess`)

A cross-validation folder (``e2e-wsi crossval``) holds one run folder per fold, ``DIR/fold_<k>``, plus
``summary.json|.md`` and ``oof_predictions.csv`` (:class:`CrossvalFolder`).

Every module that needs one of these paths asks :class:`RunFolder` / :class:`CrossvalFolder` instead of
joining names itself. Nothing here is created or read on construction.
"""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.locks import FolderLock

DEFAULT_RUN_DIR = "runs/default"
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_SUFFIX = ".ckpt"
# Lightning's ckpt_path keywords that name something other than a file.
LIGHTNING_KEYWORDS = frozenset({"last", "best", "hpc", "registry"})


class RunFolder:
    """Paths of one run folder.

    Args:
        root: The run folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    # ------------------------------------------------------------------------------------ locations
    @property
    def config(self) -> Path:
        """``config.yaml`` written by ``fit``."""
        return self.root / "config.yaml"

    def stage_config(self, stage: str) -> Path:
        """``config.yaml`` for ``fit``, ``config.<stage>.yaml`` for the other verbs."""
        return self.config if stage == "fit" else self.root / f"config.{stage}.yaml"

    @property
    def splits(self) -> Path:
        """``splits.csv``: the split of this run."""
        return self.root / "splits.csv"

    @property
    def checkpoints_dir(self) -> Path:
        """``checkpoints/``: ``best-*.ckpt`` and ``last.ckpt``."""
        return self.root / "checkpoints"

    @property
    def heatmaps_dir(self) -> Path:
        """``heatmaps/``: default output folder of ``e2e-wsi heatmap``."""
        return self.root / "heatmaps"

    @property
    def metrics(self) -> Path:
        """``metrics.json``: the bootstrap report of ``test``."""
        return self.root / "metrics.json"

    def stage_metrics(self, stage: str) -> Path:
        """``<stage>_metrics.json``: the epoch metrics of ``validate`` as logged."""
        return self.root / f"{stage}_metrics.json"

    @property
    def preprocess(self) -> Path:
        """``preprocess.json``: the preprocessing of the training cache (:mod:`e2e_wsi.runs.preprocess`)."""
        return self.root / "preprocess.json"

    @property
    def predict_dir(self) -> Path:
        """``predict/``: ``predictions.csv`` and ``attention/<slide_id>.pt`` written by ``predict``."""
        return self.root / "predict"

    @property
    def predict_attention_dir(self) -> Path:
        """``predict/attention/``: one ``<slide_id>.pt`` per predicted bag."""
        return self.predict_dir / "attention"

    @property
    def predict_predictions(self) -> Path:
        """``predict/predictions.csv``."""
        return self.predict_dir / "predictions.csv"

    @property
    def predictions(self) -> Path:
        """``predictions.csv`` of ``test``."""
        return self.root / "predictions.csv"

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>`` (``last.ckpt``, ``best-epoch=3.ckpt`` ...), whether or not it exists."""
        return self.checkpoints_dir / name

    def fit_lock(self) -> FolderLock:
        """The lock ``fit`` holds on this folder while it trains (``RUN/.fit.lock``), so a second ``fit``
        into the same ``--run_dir`` is refused, naming the holder, instead of mixing checkpoints."""
        return FolderLock(
            self.root / ".fit.lock",
            what=f"run folder {self.root}",
            holder="another `e2e-wsi fit`",
            advice="use another --run_dir",
        )

    def last_checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt`` when it exists (the state after the latest epoch)."""
        path = self.checkpoint(LAST_CHECKPOINT)
        return path if path.is_file() else None

    def checkpoints(self) -> list[Path]:
        """Every ``*.ckpt`` of the run, selected ones and ``last.ckpt``."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file())

    def has_checkpoints(self) -> bool:
        """Whether ``checkpoints/`` holds any checkpoint (a fresh ``fit`` must not mix with them)."""
        return bool(self.checkpoints())

    def best_checkpoints(self) -> list[Path]:
        """Checkpoints selected on validation (every ``*.ckpt`` but ``last.ckpt``), oldest first."""
        found = [p for p in self.checkpoints() if p.name != LAST_CHECKPOINT]
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
        run = RunFolder(folder)
        return run.splits.is_file() or run.checkpoints_dir.is_dir()

    @staticmethod
    def holds_checkpoint(ckpt_path: str | Path) -> bool:
        """Whether ``ckpt_path`` lies in some ``RUN/checkpoints/`` folder."""
        return Path(ckpt_path).parent.name == "checkpoints"

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> RunFolder:
        """``RUN/checkpoints/x.ckpt`` -> ``RUN``; a checkpoint anywhere else -> its own folder."""
        ckpt = Path(ckpt_path)
        return cls(ckpt.parent.parent if cls.holds_checkpoint(ckpt) else ckpt.parent)

    @classmethod
    def resolve(cls, run_dir: str | Path | None = None, ckpt_path: str | Path | None = None) -> RunFolder:
        """The run folder of a command: explicit, else the checkpoint's, else ``runs/default``.

        ``ckpt_path`` values ``last``/``best``/``hpc``/``registry`` are Lightning keywords, not files.
        """
        if run_dir:
            return cls(run_dir)
        if ckpt_path and str(ckpt_path) not in LIGHTNING_KEYWORDS and cls.holds_checkpoint(ckpt_path):
            return cls.of_checkpoint(ckpt_path)
        return cls(DEFAULT_RUN_DIR)


class CrossvalFolder:
    """Paths of a cross-validation folder: ``fold_<k>`` run folders plus the pooled results.

    Args:
        root: The cross-validation folder (``e2e-wsi crossval --run_dir``).
    """

    FOLD_PREFIX = "fold_"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"CrossvalFolder({str(self.root)!r})"

    def fold(self, k: int) -> RunFolder:
        """``DIR/fold_<k>``."""
        return RunFolder(self.root / f"{self.FOLD_PREFIX}{k}")

    def folds(self) -> list[RunFolder]:
        """The fold run folders that exist (``fold_0``, ``fold_1``, ...), in fold order."""
        prefix = self.FOLD_PREFIX
        found = [p for p in self.root.glob(f"{prefix}*") if p.is_dir() and p.name[len(prefix) :].isdigit()]
        return [RunFolder(p) for p in sorted(found, key=lambda p: int(p.name[len(prefix) :]))]

    @property
    def oof_predictions(self) -> Path:
        """``oof_predictions.csv``: every case's prediction from the fold that held it out."""
        return self.root / "oof_predictions.csv"

    @property
    def summary_json(self) -> Path:
        """``summary.json``: per-fold metrics, their mean and std, and the pooled report."""
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        """``summary.md``: :attr:`summary_json` as a table."""
        return self.root / "summary.md"

    @classmethod
    def is_crossval_folder(cls, folder: str | Path) -> bool:
        """Whether ``folder`` holds fold run folders and no checkpoints of its own."""
        return bool(cls(folder).folds()) and not RunFolder(folder).checkpoints_dir.is_dir()
