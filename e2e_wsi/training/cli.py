"""``e2e-wsi fit|validate|test|predict``: LightningCLI over SlideModule and WSIDataModule.

The run folder (``--run_dir``) is the one place a user looks: the resolved config, the split file,
checkpoints, TensorBoard events, the test report and predictions all go there. ``test``/``predict``
given ``--ckpt_path RUN/checkpoints/x.ckpt`` default to that checkpoint's run folder.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from e2e_wsi.data.datamodule import WSIDataModule
from e2e_wsi.models.module import SlideModule
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

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
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


def _run(subcommand: str, argv: list[str] | None) -> int:
    args = [subcommand, *(sys.argv[2:] if argv is None else argv)]
    E2ECLI(
        SlideModule,
        _datamodule_class(args),
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
