"""Build a model or an encoder from a run: its checked config plus its safely loaded checkpoint.

:func:`load_run` is what ``predict``, ``heatmap``, the notebook and the benchmarks call; :func:`load_runs`
loads every checkpoint of an ensemble (a cross-validation folder or several files);
:func:`encoder_from_run` and :func:`build_encoder` are ``extract --encoder``'s. The run's ``config.yaml``
is checked against the allow-list (:mod:`e2e_wsi.runs.allowlist`) before jsonargparse imports or builds
anything, and the checkpoint is read with ``torch.load(weights_only=True)``
(:mod:`e2e_wsi.runs.checkpoints`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from torch import nn

from e2e_wsi.data.transforms import OFFICIAL_EVAL_CROP_FRACTION
from e2e_wsi.errors import UserError
from e2e_wsi.models.module import SlideModule
from e2e_wsi.runs.allowlist import check_config, check_parsed
from e2e_wsi.runs.checkpoints import STATE_DICT, load_checkpoint
from e2e_wsi.runs.folder import RunFolder
from e2e_wsi.runs.preprocess import preprocess_params
from e2e_wsi.runs.resolve import resolve_checkpoints

# Encoder arguments that fetch initial weights; a run's checkpoint holds the trained ones.
NO_INITIAL_WEIGHTS = {"weights": "none", "pretrained": False, "weights_path": None}
DEFAULT_ENCODER = {"class_path": "e2e_wsi.models.encoders.ResNetEncoder"}


@dataclass
class LoadedRun:
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
        if getattr(self.model, "eval_resize", False):
            return 1.0
        return float(self.data.get("eval_crop_fraction") or OFFICIAL_EVAL_CROP_FRACTION)

    def preprocess_params(self) -> dict[str, Any]:
        """The preprocessing of the training cache (``RUN/preprocess.json``, else the cache's own)."""
        return preprocess_params(self.run, self.data)


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as plain data (``yaml.safe_load``; nothing is checked or built yet).

    Raises:
        FileNotFoundError: If the file is missing (says what to pass).
        UserError: If it is not a YAML mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} not found: pass --config RUN/config.yaml")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"run config {path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"run config {path} holds a {type(config).__name__}, not a mapping of sections")
    return config


def _section(config: dict[str, Any], name: str, source: Path) -> dict[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: {name} must be a mapping, not {type(value).__name__}")
    return value


def build_model(model_cfg: dict[str, Any], source: str | Path) -> SlideModule:
    """A :class:`SlideModule` from a run config's ``model`` section, without fetching initial weights.

    Every code reference is checked against the allow-list before jsonargparse imports anything, and
    again after parsing (short names resolved) before anything is instantiated.

    Raises:
        RefusedConfigError: If the section names code outside the allow-list (key and class named).
        UserError: If jsonargparse refuses the section.
    """
    check_config(model_cfg, source, "model")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SlideModule, "model", fail_untyped=False)
    cfg = _parse(parser, {"model": model_cfg}, source)
    check_parsed(cfg.model, source, "model")
    _without_initial_weights(cfg.model.get("encoder"))
    return parser.instantiate_classes(cfg).model


def build_encoder(node: dict[str, Any], source: str | Path, key: str = "encoder") -> nn.Module:
    """An encoder from a ``class_path``/``init_args`` mapping (an encoder YAML or a run's ``model.encoder``).

    Args:
        node: The mapping.
        source: The file it came from (named in errors).
        key: Dotted key of ``node`` in that file (``""``: the whole file).

    Raises:
        RefusedConfigError: If ``node`` names code outside the allow-list.
        UserError: If ``node`` is not a class spec jsonargparse accepts.
    """
    if not isinstance(node, dict) or "class_path" not in node:
        raise UserError(f"{source}: {key or 'the encoder'} must be a mapping with class_path (and init_args)")
    check_config(node, source, key)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--encoder", type=nn.Module)
    cfg = _parse(parser, {"encoder": node}, source)
    check_parsed(cfg.encoder, source, key)
    return parser.instantiate_classes(cfg).encoder


def _parse(parser: ArgumentParser, data: dict[str, Any], source: str | Path) -> Namespace:
    try:
        return parser.parse_object(data)
    except Exception as err:  # jsonargparse raises its own ArgumentError (a plain Exception subclass)
        raise UserError(f"{source}: {err}") from None


def _without_initial_weights(encoder: Any) -> None:
    """Switch off the encoder arguments that load initial weights (the checkpoint replaces them)."""
    init = encoder.get("init_args") if isinstance(encoder, Namespace) else None
    if init is None:
        return
    for key, value in NO_INITIAL_WEIGHTS.items():
        if key in init:
            init[key] = value


def load_run(source: str | Path, config: str | Path | None = None) -> LoadedRun:
    """Rebuild a run's model from its checked config and load its checkpoint's weights.

    Args:
        source: A checkpoint written by ``e2e-wsi fit`` (``RUN/checkpoints/x.ckpt``) or a run folder
            (its best checkpoint).
        config: The run's ``config.yaml``; default: the one of the checkpoint's run folder.

    Returns:
        The model in eval mode on the CPU, with its data settings.

    Raises:
        FileNotFoundError: If the checkpoint or config is missing (the message says what to pass).
        RefusedConfigError: If the config names code outside the allow-list.
        UnsafeCheckpointError: If the checkpoint is remote or holds pickled objects.
    """
    source = Path(source)
    ckpt = RunFolder(source).require_checkpoint() if source.is_dir() else source
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found")
    config_path = Path(config) if config else RunFolder.of_checkpoint(ckpt).config
    raw = read_run_config(config_path)
    model = build_model(_section(raw, "model", config_path), config_path)
    checkpoint = load_checkpoint(ckpt)  # weights_only=True; remote or unsafe files refused
    # Before the weights, as Lightning does: the input contract (channel order, evaluation resize),
    # converted EMA keys, and for feature runs the training features' settings.
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint[STATE_DICT])
    model.eval()
    return LoadedRun(model, _section(raw, "data", config_path), ckpt, RunFolder(config_path.parent))


def load_runs(run: str | Path | None, ckpts: Sequence[str | Path] | None = None) -> list[LoadedRun]:
    """Every model of an ensemble: a run's best checkpoint, each fold of a crossval folder, or files.

    Args:
        run: A run folder or a cross-validation folder (may be ``None`` with ``ckpts``).
        ckpts: Checkpoint files, or names inside ``RUN/checkpoints``; they win over ``run``.
    """
    return [load_run(c) for c in resolve_checkpoints(run, ckpts)]


def encoder_from_run(source: str | Path) -> tuple[nn.Module, int | None]:
    """The trained encoder of an end-to-end run: its ``model.encoder`` with the checkpoint's weights.

    Args:
        source: ``RUN/checkpoints/x.ckpt`` or a run folder (its best checkpoint).

    Returns:
        The frozen encoder and the run's ``data.eval_patch_size`` (``None`` when not set).

    Raises:
        RefusedConfigError: If the run's ``model.encoder`` names code outside the allow-list.
        FileNotFoundError: If the run has no config.
    """
    source = Path(source)
    ckpt = RunFolder(source).require_checkpoint() if source.is_dir() else source
    run = RunFolder.of_checkpoint(ckpt.resolve())
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.config} not found: a run checkpoint must sit in RUN/checkpoints/")
    raw = read_run_config(run.config)
    node = dict(_section(raw, "model", run.config).get("encoder") or DEFAULT_ENCODER)
    init = dict(node.get("init_args") or {})
    init.update({k: v for k, v in NO_INITIAL_WEIGHTS.items() if k in init})  # the checkpoint holds them
    encoder = build_encoder({**node, "init_args": init}, run.config, "model.encoder")
    state = load_checkpoint(ckpt)[STATE_DICT]
    own = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    encoder.load_state_dict(own, strict=True)
    encoder.requires_grad_(False)
    return encoder, _section(raw, "data", run.config).get("eval_patch_size")
