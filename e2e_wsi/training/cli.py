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

import json
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, instantiate_class

from e2e_wsi.data.datamodule import WSIDataModule
from e2e_wsi.models.module import SlideModule
from e2e_wsi.models.tasks import Task, default_task
from e2e_wsi.training.callbacks import (
    LastCheckpoint,
    NoValidationFallback,
    PredictionWriter,
    TestReportWriter,
)
from e2e_wsi.training.run import DEFAULT_RUN_DIR, RunFolder


class RunConfigSaver(SaveConfigCallback):
    """Writes ``config.yaml`` for ``fit`` and ``config.<stage>.yaml`` for the other verbs."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))
        if stage != "fit":
            self.config_filename = f"config.{stage}.yaml"
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
        if isinstance(args, list):
            args, self._derived_flags = _pop_derived_flags(args)
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        _check_derived_data_keys(cfg, getattr(self, "_derived_flags", {}))
        run_dir = resolve_run_dir(cfg.get("run_dir"), cfg.get("ckpt_path"))
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
        _cpu_safe_precision(cfg.trainer)
        _reuse_split(cfg, run_dir, self.subcommand)
        if self.subcommand == "fit":
            _refuse_clobbering(run_dir, cfg.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        extra = [NoValidationFallback()]
        if self.subcommand == "fit":
            extra.append(LastCheckpoint())
        if self.subcommand == "test":
            extra.append(TestReportWriter(n_resamples=cfg.bootstrap, seed=cfg.bootstrap_seed))
        if self.subcommand == "predict":
            extra.append(PredictionWriter())
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        kwargs["callbacks"] = [*configured, *kwargs.get("callbacks", []), *extra]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        print(f"e2e-wsi: run folder {Path(self.trainer.default_root_dir).resolve()}", flush=True)
        if self.trainer.is_global_zero:
            # issue 14: RUN/preprocess.json, so `e2e-wsi predict` tiles new slides like the training ones.
            from e2e_wsi.inference.params import record_preprocess_params

            record_preprocess_params(RunFolder(self.trainer.default_root_dir), self.datamodule.cache_dir)

    def after_fit(self) -> None:
        run = Path(self.trainer.default_root_dir).resolve()
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        print(f"e2e-wsi: run folder {run}")
        if best:
            print(f"e2e-wsi: best checkpoint {best}")
        print(f"e2e-wsi: tensorboard --logdir {run}", flush=True)

    def after_validate(self) -> None:
        _write_metrics(self.trainer, "validate")


def _write_metrics(trainer, stage: str) -> None:
    """``RUN/<stage>_metrics.json``: the epoch metrics as logged (gathered over ranks), rank 0 only."""
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    path = Path(trainer.default_root_dir) / f"{stage}_metrics.json"
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
        SystemExit: Naming the key to delete and the ``model.task`` key that now decides, on disagreement.
    """
    given = {k: cfg.data.pop(k) for k in _DERIVED_DATA_KEYS if cfg.data.get(k) is not None}
    given.update(flags)
    if not given:
        return
    spec = cfg.model.get("task")
    task = default_task(instantiate_class((), spec.as_dict()) if spec is not None else None)
    name = type(task).__name__
    if "task" in given and str(given["task"]) != task.kind:
        raise SystemExit(
            f"e2e-wsi: data.task={given['task']!r} disagrees with model.task ({name}, a {task.kind!r} task). "
            "The data now follows model.task: delete data.task and choose the task with model.task."
        )
    k = task.num_targets
    if "num_classes" in given and k is not None and str(given["num_classes"]).strip() != str(k):
        what = "num_bins" if task.kind == "survival" else "num_classes"
        raise SystemExit(
            f"e2e-wsi: data.num_classes={given['num_classes']} disagrees with model.task.{what}={k} ({name}). "
            f"The data now follows model.task: delete data.num_classes and set model.task.init_args.{what}."
        )


def resolve_run_dir(run_dir: str | None, ckpt_path: str | None) -> Path:
    """The run folder: explicit, else the folder holding ``checkpoints/`` of ``ckpt_path``, else default."""
    return RunFolder.resolve(run_dir, ckpt_path).root


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


def _reuse_split(cfg: Namespace, run_dir: Path, subcommand: str | None) -> None:
    """Evaluating or resuming a run uses the split that run wrote, never a recomputed one."""
    split_file = run_dir / "splits.csv"
    resuming = subcommand == "fit" and cfg.get("ckpt_path")
    if (subcommand != "fit" or resuming) and not cfg.data.get("split_file") and split_file.is_file():
        cfg.data.split_file = str(split_file)


def _refuse_clobbering(run_dir: Path, ckpt_path: str | None) -> None:
    """A fresh fit must not mix its checkpoints with an earlier run's."""
    ckpts = run_dir / "checkpoints"
    if ckpt_path is None and ckpts.is_dir() and any(ckpts.glob("*.ckpt")):
        raise SystemExit(
            f"e2e-wsi fit: run folder {run_dir} already holds checkpoints. Resume it with "
            "`--ckpt_path last`, or start a new run with another `--run_dir`."
        )


def _run(subcommand: str, argv: list[str] | None) -> int:
    args = [subcommand, *(sys.argv[2:] if argv is None else argv)]
    E2ECLI(
        SlideModule,
        WSIDataModule,
        args=args,
        save_config_callback=RunConfigSaver,
        # The optimizer and schedule are SlideModule arguments (model.optimizer, model.lr_scheduler);
        # LightningCLI's own top-level --optimizer would silently bypass the encoder lr multiplier.
        auto_configure_optimizers=False,
    )
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
