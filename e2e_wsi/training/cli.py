"""``e2e-wsi fit|validate|test|predict``: LightningCLI over SlideModule and WSIDataModule.

The run folder (``--run_dir``) is the one place a user looks: the resolved config, the split file,
checkpoints, TensorBoard events, the test report and predictions all go there. ``test``/``predict``
given ``--ckpt_path RUN/checkpoints/x.ckpt`` default to that checkpoint's run folder.

The task is stated once, as ``model.task``: ``data.task`` and ``data.num_classes`` are linked from it
(jsonargparse argument links), and :class:`~e2e_wsi.training.callbacks.BestCheckpoint` takes its metric
from it. Old configs that still give ``data.task``/``data.num_classes`` run when they agree with
``model.task`` and stop with a message naming the key otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, instantiate_class

from e2e_wsi.cli_common import canonical_argv
from e2e_wsi.data.datamodule import WSIDataModule
from e2e_wsi.errors import UserError
from e2e_wsi.evaluation.bootstrap import check_resamples
from e2e_wsi.models.module import SlideModule
from e2e_wsi.models.tasks import Task, default_task
from e2e_wsi.runs.allowlist import check_parsed, checked_command_configs, config_arguments
from e2e_wsi.runs.checkpoints import UnsafeCheckpointError, is_remote, verify_checkpoint
from e2e_wsi.runs.folder import DEFAULT_RUN_DIR, RunFolder
from e2e_wsi.runs.preprocess import record_preprocess_params
from e2e_wsi.runs.resolve import command_run_folder, resolve_checkpoint
from e2e_wsi.training.callbacks import (
    LastCheckpoint,
    NoValidationFallback,
    PredictionWriter,
    TestReportWriter,
    defined_metric_class_path,
)
from e2e_wsi.training.progress import PlainProgress, wants_plain_progress
from e2e_wsi.utils import DISK_FULL_ERRNOS


class RunConfigSaver(SaveConfigCallback):
    """Writes ``config.yaml`` for ``fit`` and ``config.<stage>.yaml`` for the other verbs."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))
        self.config_filename = RunFolder(trainer.default_root_dir).stage_config(stage).name
        self.overwrite = True
        super().setup(trainer, pl_module, stage)


class E2ECLI(LightningCLI):
    """LightningCLI with a run folder, CPU-safe precision and the project's default callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Run folder for config, splits, checkpoints, logs and reports "
            f"(default: the checkpoint's run folder for test/predict, else {DEFAULT_RUN_DIR}).",
        )
        parser.add_argument(
            "--bootstrap", type=int, default=1000, help="Bootstrap resamples in the test report."
        )
        parser.add_argument("--bootstrap_seed", type=int, default=0, help="Seed of the bootstrap resampling.")
        # One statement of the task: the data side follows the model's task object once it exists.
        parser.link_arguments("model.task", "data.task", compute_fn=task_kind, apply_on="instantiate")
        parser.link_arguments(
            "model.task", "data.num_classes", compute_fn=task_num_targets, apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse ``args`` (always given: the verb's own argv).

        Lightning warns whenever ``args`` is passed while ``sys.argv`` holds more than the program name,
        to catch scripts that mix both. ``e2e-wsi VERB ...`` always passes its argv explicitly (``sys.argv``
        minus the verb), so that warning would fire on every run and say nothing a user can act on.
        Old ``--data.task``/``--data.num_classes`` flags are taken out here and checked against
        ``model.task`` in :meth:`before_instantiate_classes` (jsonargparse refuses flags for linked keys).
        """
        # Remember what the user typed: an explicit --run_dir wins over the run_dir stored in a config.
        self._cli_args = [str(a) for a in (sys.argv[1:] if args is None else args)]
        # Configs from run folders may name only allow-listed classes: checked on the YAML data before
        # jsonargparse imports anything they name, and again once parsed, before instantiation.
        subcommand = self._cli_args[0] if self._cli_args else "fit"
        checked = checked_command_configs(subcommand, config_arguments(self._cli_args[1:]))
        if isinstance(args, list):
            args, self._derived_flags = _pop_derived_flags(args)
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        if checked:
            parsed = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
            check_parsed(parsed, ", ".join(map(str, checked)))

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before anything else touches the file:
        # refuse a remote or unsafe checkpoint first, with a message instead of an unpickling traceback.
        cfg = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path and (is_remote(ckpt_path) or Path(ckpt_path).is_file()):
            verify_checkpoint(str(ckpt_path))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        _check_derived_data_keys(cfg, getattr(self, "_derived_flags", {}))
        subcommand = self.subcommand or "fit"
        cli_args = getattr(self, "_cli_args", [])
        ckpt_arg = _ckpt_argument(cfg, subcommand, cli_args)
        run = resolve_run_folder(cfg, ckpt_arg, cli_args)
        run_dir = run.root
        cfg.run_dir = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        logger = cfg.trainer.get("logger")
        # A saved run config carries the TensorBoard logger of the folder it was written in; re-aim
        # it (and a fresh config's default logger) at this run folder so events and checkpoints land here.
        if logger in (None, True) or str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
            cfg.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=str(run_dir), name="", version=""),
            )
        if subcommand == "fit":
            _lock_run_folder(run)
        _cpu_safe_precision(cfg.trainer)
        _skip_undefined_metrics(cfg.trainer)
        self._ckpt_path = _secure_checkpoint(cfg, subcommand, run, ckpt_arg)
        if subcommand == "test":
            check_resamples(int(cfg.bootstrap))
        _reuse_split(cfg, run_dir, subcommand, self._ckpt_path, cli_args)
        if subcommand == "fit":
            _refuse_clobbering(run_dir, self._ckpt_path)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # The checkpoint checked in before_instantiate_classes, always loaded with weights_only=True.
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["ckpt_path"] = getattr(self, "_ckpt_path", kwargs.get("ckpt_path"))
        kwargs["weights_only"] = True
        return kwargs

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        extra = [NoValidationFallback()]
        if self.subcommand == "fit":
            extra.append(LastCheckpoint())
            if wants_plain_progress():  # a log file or a pipe: the bar would show nothing until the end
                extra.append(
                    PlainProgress(every_n_steps=max(1, int(cfg.trainer.get("log_every_n_steps") or 50)))
                )
        if self.subcommand == "test":
            extra.append(TestReportWriter(n_resamples=cfg.bootstrap, seed=cfg.bootstrap_seed))
        if self.subcommand == "predict":
            extra.append(PredictionWriter())
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        kwargs["callbacks"] = [*configured, *kwargs.get("callbacks", []), *extra]
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        run = Path(self.trainer.default_root_dir)
        before, started = set(run.glob(_EVENTS)), time.time()
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            if self.trainer.is_global_zero:
                _remove_stray_events(run, before, started)
            if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
                # A checkpoint or log that cannot be written: one line, and how to carry on.
                raise UserError(
                    f"cannot write {err.filename or f'into the run folder {run}'} ({err.strerror}): free disk "
                    f"space, then resume with `e2e-wsi fit ... --ckpt_path last` (checkpoints are written "
                    "whole or not at all)"
                ) from err
            raise

    def before_fit(self) -> None:
        print(f"e2e-wsi: run folder {Path(self.trainer.default_root_dir).resolve()}", flush=True)
        cache_dir = getattr(self.datamodule, "cache_dir", None)  # feature runs train from .h5 files
        if self.trainer.is_global_zero and cache_dir is not None:
            # RUN/preprocess.json, so `e2e-wsi predict` tiles new slides like the training ones.
            record_preprocess_params(RunFolder(self.trainer.default_root_dir), cache_dir)

    def after_fit(self) -> None:
        run = Path(self.trainer.default_root_dir).resolve()
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        print(f"e2e-wsi: run folder {run}")
        if best:
            print(f"e2e-wsi: best checkpoint {best}")
        print(f"e2e-wsi: tensorboard --logdir {run}", flush=True)

    def after_validate(self) -> None:
        _write_metrics(self.trainer, "validate")


_EVENTS = "events.out.tfevents.*"
# Run-folder locks taken by this process's `fit`, released when the command ends (see `_run`).
_HELD_LOCKS: list = []


def _lock_run_folder(run: RunFolder) -> None:
    """Hold ``RUN/.fit.lock`` for the rest of the command; raises ``LockedError`` naming the holder.

    Only the launching process locks: DDP ranks started by Lightning run this CLI again in the same
    folder and must not refuse their own run.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    lock = run.fit_lock()
    lock.acquire()
    _HELD_LOCKS.append(lock)


def _remove_stray_events(run: Path, before: set[Path], started: float) -> None:
    """After a failed command: delete the TensorBoard events files it created, unless it got far enough
    to write a checkpoint (then the curves belong to a run that can be resumed)."""
    if any(p.stat().st_mtime >= started for p in RunFolder(run).checkpoints()):
        return
    for events in set(run.glob(_EVENTS)) - before:
        events.unlink(missing_ok=True)


def _write_metrics(trainer, stage: str) -> None:
    """``RUN/<stage>_metrics.json``: the epoch metrics as logged (gathered over ranks), rank 0 only."""
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    path = RunFolder(trainer.default_root_dir).stage_metrics(stage)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"e2e-wsi: {stage} metrics {path.resolve()}", flush=True)


# Data keys that follow model.task; old configs and command lines may still give them.
_DERIVED_DATA_KEYS = ("task", "num_classes")


def task_kind(task: Task | None) -> str:
    """``data.task`` from ``model.task`` (``None`` is SlideModule's default task)."""
    return default_task(task).kind


def task_num_targets(task: Task | None) -> int | None:
    """``data.num_classes`` from ``model.task``: its classes or survival bins (``None``: the data's default)."""
    return default_task(task).num_targets


def _pop_derived_flags(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take ``--data.task X`` / ``--data.num_classes K`` out of ``args`` (linked keys cannot be parsed)."""
    rest: list[str] = []
    given: dict[str, str] = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        key = flag.removeprefix("--data.")
        if flag.startswith("--data.") and key in _DERIVED_DATA_KEYS:
            if not eq and i + 1 < len(args):
                value, i = args[i + 1], i + 1
            given[key] = value
        else:
            rest.append(args[i])
        i += 1
    return rest, given


def _check_derived_data_keys(cfg: Namespace, flags: dict[str, str]) -> None:
    """Accept an old config's ``data.task``/``data.num_classes`` when they agree with ``model.task``.

    Raises:
        UserError: Naming the key to delete and the ``model.task`` key that now decides, on disagreement.
    """
    given = {k: cfg.data.pop(k) for k in _DERIVED_DATA_KEYS if cfg.data.get(k) is not None}
    given.update(flags)
    if not given:
        return
    spec = cfg.model.get("task")
    task = default_task(instantiate_class((), spec.as_dict()) if spec is not None else None)
    name = type(task).__name__
    if "task" in given and str(given["task"]) != task.kind:
        raise UserError(
            f"data.task={given['task']!r} disagrees with model.task ({name}, a {task.kind!r} task). "
            "The data now follows model.task: delete data.task and choose the task with model.task."
        )
    k = task.num_targets
    if "num_classes" in given and k is not None and str(given["num_classes"]).strip() != str(k):
        what = task.num_targets_name
        raise UserError(
            f"data.num_classes={given['num_classes']} disagrees with model.task.{what}={k} ({name}). "
            f"The data now follows model.task: delete data.num_classes and set model.task.init_args.{what}."
        )


def _explicit(cli_args: list[str], key: str) -> bool:
    return any(a == key or a.startswith(f"{key}=") for a in cli_args)


def _ckpt_argument(cfg: Namespace, subcommand: str, cli_args: list[str]) -> str | None:
    """The ``ckpt_path`` that counts. ``validate``/``test``/``predict`` take it from the command line only:
    a ``ckpt_path`` inside a run's ``config.yaml`` is where its ``fit`` resumed from, not the checkpoint
    to evaluate (that is the run's best one)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt and subcommand != "fit" and not _explicit(cli_args, "--ckpt_path"):
        print(f"e2e-wsi {subcommand}: ignoring ckpt_path {ckpt} of the config (pass --ckpt_path to choose)")
        return None
    return None if ckpt is None else str(ckpt)


def resolve_run_folder(cfg: Namespace, ckpt_path: str | None, cli_args: list[str]) -> RunFolder:
    """The run folder a command writes into (:func:`e2e_wsi.runs.resolve.command_run_folder`)."""
    configs = [Path(getattr(c, "absolute", c)) for c in cfg.get("config") or []]
    return command_run_folder(cfg.get("run_dir"), _explicit(cli_args, "--run_dir"), configs, ckpt_path)


def _secure_checkpoint(cfg: Namespace, subcommand: str, run: RunFolder, ckpt_path: str | None) -> str | None:
    """Resolve ``ckpt_path`` to a local file and check that it loads with ``weights_only=True``
    (see :mod:`e2e_wsi.runs.checkpoints`); Lightning then loads it with ``weights_only=True`` too.

    Returns:
        The checkpoint file (or a Lightning keyword such as ``hpc``), ``None`` for a fresh fit.
    """
    if cfg.get("weights_only") is False:
        raise UnsafeCheckpointError(
            "--weights_only false is not supported: e2e-wsi loads checkpoints with weights_only=True only"
        )
    if "weights_only" in cfg:
        cfg.weights_only = True
    ckpt = resolve_checkpoint(subcommand, ckpt_path, run)
    if ckpt is not None and str(ckpt) not in {"hpc", "registry"}:
        if str(ckpt_path) != ckpt:
            print(f"e2e-wsi {subcommand}: checkpoint {Path(ckpt).resolve()}", flush=True)
        verify_checkpoint(ckpt)
    if subcommand != "fit":
        cfg.ckpt_path = ckpt  # config.<stage>.yaml records the checkpoint that was evaluated
    return ckpt


def _cpu_safe_precision(trainer_cfg: Namespace) -> None:
    """fp16 autocast needs CUDA; on a CPU-only machine fall back to 32-bit (bf16 is far slower here)."""
    precision = str(trainer_cfg.get("precision") or "32")
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision.startswith("16"):
        warnings.warn(
            f"precision={precision} needs a CUDA GPU; running in 32-bit on this CPU-only machine",
            stacklevel=2,
        )
        trainer_cfg.precision = "32-true"


def _skip_undefined_metrics(trainer_cfg: Namespace) -> None:
    """Checkpoint selection and early stopping ignore NaN (undefined) metrics, whatever they monitor."""
    callbacks = trainer_cfg.get("callbacks")
    for cb in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        if isinstance(cb, Namespace) and cb.get("class_path"):
            cb.class_path = defined_metric_class_path(cb.class_path)


def _reuse_split(
    cfg: Namespace, run_dir: Path, subcommand: str, ckpt: str | None, cli_args: list[str]
) -> None:
    """Evaluating or resuming a run uses the split its checkpoint was trained with, never a recomputed one.

    The checkpoint's own run folder comes first (resuming into a new ``--run_dir`` keeps the old run's
    split, whatever ``data.split_seed`` says), then this run folder. A checkpoint also carries its split's
    fingerprint, so a resume with any other split is refused (``WSIDataModule.load_state_dict``).
    A ``--data.split_file`` typed on the command line wins; one stored in a copied run's config
    (the original run's file) gives way to the split file of the run folders above.
    """
    if _explicit(cli_args, "--data.split_file") or (subcommand == "fit" and not ckpt):
        return
    candidates = [RunFolder(run_dir).splits]
    if ckpt and Path(ckpt).is_file():
        candidates.insert(0, RunFolder.of_checkpoint(ckpt).splits)
    for split_file in candidates:
        if split_file.is_file():
            cfg.data.split_file = str(split_file)
            print(f"e2e-wsi {subcommand}: split of {split_file.resolve()}", flush=True)
            return


def _refuse_clobbering(run_dir: Path, ckpt_path: str | None) -> None:
    """A fresh fit must not mix its checkpoints with an earlier run's."""
    if ckpt_path is None and RunFolder(run_dir).has_checkpoints():
        raise UserError(
            f"run folder {run_dir} already holds checkpoints. Resume it with "
            "`--ckpt_path last`, or start a new run with another `--run_dir`."
        )


def _datamodule_class(args: list[str]) -> type:
    """``FeatureDataModule`` when the data section names ``features_dir`` (flag or config), else patches.

    Chosen from the arguments rather than by ``class_path`` so existing configs (``data: {cache_dir:
    ...}``) keep working unchanged.
    """
    import yaml

    if any(a.startswith("--data.features_dir") for a in args):
        return _feature_datamodule()
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.partition("=")[2]
        if (arg == "--config" or arg.startswith("--config=")) and Path(path).is_file():
            data = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
            if isinstance(data, dict) and "features_dir" in data:
                return _feature_datamodule()
    return WSIDataModule


def _feature_datamodule() -> type:
    from e2e_wsi.features.datamodule import FeatureDataModule

    return FeatureDataModule


# Shown at the top of `e2e-wsi fit --help` (the full list of ~300 options follows).
COMMON_OPTIONS = """\
Common options (every option is listed further down, and each can also be set in the --config YAML):
  --config FILE               run config (YAML), e.g. configs/demo_subtype.yaml; a run's RUN/config.yaml
  --run_dir DIR               run folder (default: runs/default; test/predict: the checkpoint's run)
  --ckpt_path PATH|last       checkpoint to resume from (fit) or to evaluate (validate/test/predict)
  --data.manifest CSV         slides and labels
  --data.cache_dir DIR        patch cache from `e2e-wsi preprocess` (feature runs: --data.features_dir)
  --trainer.max_epochs N      epochs to train
  --trainer.accelerator NAME  cpu, gpu or auto; --trainer.devices N for several
  --model.aggregator CLASS    e.g. e2e_wsi.models.aggregators.ABMIL (registered names: docs/contributing.md)
  --print_config              print the resolved config and exit
Hyphens are accepted for underscores (--run-dir, --trainer.max-epochs). Defaults are shown per option.
Find one with e.g. `e2e-wsi fit --help | grep -A2 max_epochs`."""


def _parser_kwargs(subcommand: str) -> dict:
    """Program name, short usage line and the common options for the verb's ``--help``."""
    return {
        "prog": "e2e-wsi",
        "formatter_class": _HelpFormatter,  # jsonargparse gives sub-command parsers their parent's
        subcommand: {
            "description": COMMON_OPTIONS,
            "usage": f"e2e-wsi {subcommand} [--config FILE] [--OPTION VALUE ...]",
        },
    }


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (types and defaults per option) with the description kept as written."""


def _run(subcommand: str, argv: list[str] | None) -> int:
    # One spelling everywhere: hyphenated options (--run-dir, --trainer.max-epochs) become the canonical
    # underscore names jsonargparse knows, as in every argparse verb.
    args = [subcommand, *canonical_argv(sys.argv[2:] if argv is None else argv)]
    try:
        E2ECLI(
            SlideModule,
            _datamodule_class(args),
            args=args,
            parser_kwargs=_parser_kwargs(subcommand),
            save_config_callback=RunConfigSaver,
            # The optimizer and schedule are SlideModule arguments (model.optimizer, model.lr_scheduler);
            # LightningCLI's own top-level --optimizer would silently bypass the encoder lr multiplier.
            auto_configure_optimizers=False,
        )
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().release()
    return 0


def fit_main(argv: list[str] | None = None) -> int:
    """``e2e-wsi fit``: train (``--ckpt_path last`` resumes the run folder's last checkpoint)."""
    return _run("fit", argv)


def validate_main(argv: list[str] | None = None) -> int:
    """``e2e-wsi validate``: evaluate a checkpoint on the validation split."""
    return _run("validate", argv)


def test_main(argv: list[str] | None = None) -> int:
    """``e2e-wsi test``: evaluate on the test split; writes predictions.csv and the bootstrap report."""
    return _run("test", argv)


def predict_main(argv: list[str] | None = None) -> int:
    """``e2e-wsi predict``: per-slide predictions and per-patch attention into the run folder."""
    return _run("predict", argv)
