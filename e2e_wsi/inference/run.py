"""Load trained models from run folders, checkpoints or a cross-validation folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from e2e_wsi.data.transforms import OFFICIAL_EVAL_CROP_FRACTION
from e2e_wsi.models.module import SlideModule
from e2e_wsi.training.checkpoints import load_checkpoint
from e2e_wsi.training.run import RunFolder


@dataclass
class LoadedModel:
    """A trained model with what is needed to feed it.

    Attributes:
        model: The model, in eval mode, on the CPU.
        data: The run config's ``data`` section (magnifications, patch sizes, cache folder).
        checkpoint: The checkpoint its weights came from.
        run: The run folder the config came from.
    """

    model: SlideModule
    data: dict
    checkpoint: Path
    run: RunFolder

    @property
    def task_kind(self) -> str:
        """``classification``, ``grading`` or ``survival``."""
        return str(self.model.task.kind)

    @property
    def eval_magnifications(self) -> list[float]:
        """Magnifications of evaluation bags: ``eval_magnifications``, else the main magnification."""
        mags = self.data.get("eval_magnifications") or list(self.data.get("magnifications") or [10.0])[:1]
        return [float(m) for m in mags]

    @property
    def eval_patch_size(self) -> int:
        """Side of the patches the model sees at evaluation."""
        return int(self.data.get("eval_patch_size", 224))

    @property
    def eval_crop_fraction(self) -> float:
        """Centre crop of the cached patch the model sees at evaluation: 1.0 (whole patch resized) when
        the model requires it (``eval_resize``), else ``data.eval_crop_fraction``."""
        if self.model.eval_resize:
            return 1.0
        return float(self.data.get("eval_crop_fraction") or OFFICIAL_EVAL_CROP_FRACTION)


def load_model(ckpt_path: str | Path, config_path: str | Path | None = None) -> LoadedModel:
    """Rebuild the model of a run from its saved config and load a checkpoint's weights.

    Args:
        ckpt_path: A checkpoint written by ``e2e-wsi fit``.
        config_path: The run's ``config.yaml``; default: the one in the checkpoint's run folder.

    Raises:
        FileNotFoundError: If the checkpoint or config is missing (the message says what to pass).
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    run = RunFolder.of_checkpoint(ckpt_path)
    config_path = Path(config_path) if config_path else run.config
    if not config_path.is_file():
        raise FileNotFoundError(f"run config {config_path} not found: pass --config RUN/config.yaml")
    config = yaml.safe_load(config_path.read_text()) or {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SlideModule, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": config.get("model") or {}})
    model = parser.instantiate_classes(cfg).model
    checkpoint = load_checkpoint(ckpt_path)  # weights_only=True; remote or unsafe files refused
    # Before the weights, as Lightning does: the input contract (channel order, evaluation resize),
    # converted EMA keys, and for feature runs the training features' settings.
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return LoadedModel(model, config.get("data") or {}, ckpt_path, RunFolder(config_path.parent))


def load_run(ckpt_path: str | Path, config_path: str | Path | None = None) -> tuple[SlideModule, dict]:
    """:func:`load_model` as ``(model in eval mode, the config's data section)``."""
    loaded = load_model(ckpt_path, config_path)
    return loaded.model, loaded.data


def fold_runs(root: str | Path) -> list[RunFolder]:
    """The fold run folders of a cross-validation folder (``fold_0``, ``fold_1``, ...), in fold order."""
    folds = [p for p in Path(root).glob("fold_*") if p.is_dir() and p.name[5:].isdigit()]
    return [RunFolder(p) for p in sorted(folds, key=lambda p: int(p.name[5:]))]


def resolve_checkpoints(run: str | Path | None, ckpts: list[str] | None = None) -> list[Path]:
    """The checkpoints a command uses.

    Args:
        run: A run folder of ``fit`` (its best checkpoint) or a ``crossval`` folder (the best checkpoint
            of every fold); may be ``None`` when ``ckpts`` are given.
        ckpts: Explicit checkpoint files (or names inside ``RUN/checkpoints``); they win over ``run``.

    Returns:
        One or more checkpoint paths.

    Raises:
        FileNotFoundError: If a checkpoint is missing or the run folder holds none (says what to do).
        ValueError: If neither is given.
    """
    if ckpts:
        base = RunFolder(run).checkpoints_dir if run else None
        out = []
        for c in ckpts:
            path = Path(c)
            if not path.is_file() and base is not None and (base / c).is_file():
                path = base / c
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {c} not found (give a .ckpt file or a name in {base})")
            out.append(path)
        return out
    if run is None:
        raise ValueError("give a run folder (--run RUN) or checkpoint(s) (--ckpt FILE ...)")
    root = Path(run)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} not found")
    folds = fold_runs(root)
    if folds and not RunFolder(root).checkpoints_dir.is_dir():
        return [f.require_checkpoint() for f in folds]
    return [RunFolder(root).require_checkpoint()]
