"""SlideModule: encoder + aggregator + head trained jointly from slide labels (the E2E model)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from e2e_wsi.errors import UserError
from e2e_wsi.images import IMAGENET_MEAN, IMAGENET_STD, check_channel_order, normalize_images
from e2e_wsi.models.aggregators import ABMILX
from e2e_wsi.models.encoders import PrecomputedFeatures, ResNetEncoder
from e2e_wsi.models.optim import WarmupCosineLR, apply_lr_mult, encoder_param_groups
from e2e_wsi.models.tasks import Task, default_task
from e2e_wsi.runs.checkpoints import FEATURES
from e2e_wsi.utils import describe_difference

AggregatorFactory = Callable[[int], nn.Module]
# Checkpoint entry holding what the weights need from their input (SlideModule.input_contract).
INPUT_CONTRACT_KEY = "e2e_wsi_input"
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


class SlideModule(L.LightningModule):
    """End-to-end slide model: patches -> encoder -> aggregator -> task head.

    Args:
        task: What to predict; builds the head, loss and metrics. ``None``: ``ClassificationTask()``.
        encoder: Patch encoder mapping [N, 3, h, w] to [N, D], with an ``out_dim`` attribute, and
            ``mean``/``std`` used to normalise uint8 patches (ImageNet when absent).
            ``None``: a randomly initialised ``ResNetEncoder()`` (ResNet-18 to layer3).
            ``PrecomputedFeatures()``: the two-stage model, bags hold features [N, D]; with ``dim`` unset
            the aggregator and head are built in ``configure_model`` from the datamodule's
            ``feature_dim``, so the aggregator's width follows the features.
        aggregator: Factory called with the encoder's ``out_dim`` (YAML: ``class_path`` + ``init_args``
            without ``in_dim``); returns a module ``(x [B, N, D], mask [B, N]) -> (slide, attention)``.
        optimizer: Factory called with the parameter groups (encoder group scaled by
            ``encoder_lr_mult``).
        lr_scheduler: Factory called with ``(optimizer, total_steps)``; stepped every optimizer step,
            or every epoch when the scheduler says ``interval = "epoch"`` (``EpochCosineLR``, the
            official schedule). ``None`` keeps the rate constant.
        encoder_lr_mult: Learning-rate multiplier for the encoder relative to the MIL part.
        ema_decay: If set, keep an exponential moving average of all weights and evaluate with it.
        eval_chunk_size: Patches encoded at once during evaluation (bounds memory for 10k+ bags).
    """

    def __init__(
        self,
        task: Task | None = None,
        encoder: nn.Module | None = None,
        aggregator: AggregatorFactory = ABMILX,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: SchedulerFactory | None = WarmupCosineLR,
        encoder_lr_mult: float = 1.0,
        ema_decay: float | None = None,
        eval_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        # Built here, not as default arguments, so two modules never share one default instance.
        task = default_task(task)
        encoder = encoder if encoder is not None else ResNetEncoder()
        if not hasattr(encoder, "out_dim"):
            raise ValueError(f"encoder {type(encoder).__name__} must expose `out_dim`")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if eval_chunk_size < 1:
            raise ValueError(f"eval_chunk_size must be >= 1, got {eval_chunk_size}")
        self.task = task
        self.encoder = encoder
        self.aggregator_factory = aggregator
        self.ema_decay = ema_decay
        self.loss_fn = task.build_loss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.encoder_lr_mult = encoder_lr_mult
        self.eval_chunk_size = eval_chunk_size
        # Settings of the features the model was trained on (two-stage runs), checked at test/predict.
        self.feature_settings: dict | None = None
        self.ema: AveragedModel | None = None
        if encoder.out_dim is not None:
            self._build_mil(int(encoder.out_dim))
        # One metric collection per stage; attribute names avoid clashing with nn.Module.train.
        self.train_metrics = task.metrics().clone(prefix="train/")
        self.val_metrics = task.metrics().clone(prefix="val/")
        self.test_metrics = task.metrics().clone(prefix="test/")

    # ----------------------------------------------------------------------------------------- model
    def _build_mil(self, in_dim: int) -> None:
        """Aggregator, head and EMA copy for ``in_dim``-wide instance features."""
        self.aggregator = self.aggregator_factory(in_dim)
        self.head = self.task.build_head(int(self.aggregator.out_dim))
        if self.ema_decay is not None:
            decay = get_ema_multi_avg_fn(self.ema_decay)
            self.ema = AveragedModel(self._trainable(), multi_avg_fn=decay, use_buffers=True)

    @property
    def built(self) -> bool:
        """False until a feature model learns its input width (``configure_model`` / checkpoint)."""
        return hasattr(self, "head")

    def configure_model(self) -> None:
        """Build a feature model's aggregator from the datamodule's ``feature_dim`` (after its setup)."""
        if self.built:
            return
        dm = getattr(self.trainer, "datamodule", None)
        dim = getattr(dm, "feature_dim", None)
        if dim is None:
            raise ValueError(
                "model.encoder is PrecomputedFeatures without `dim`, and the data gives no feature_dim: "
                "use a feature datamodule (data.features_dir) or set model.encoder.init_args.dim"
            )
        self.encoder.set_dim(int(dim))
        self._build_mil(int(dim))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also rebuilds a lazily built feature model from its weights (``encoder.width``)."""
        width = state_dict.get("encoder.width")
        if not self.built and isinstance(self.encoder, PrecomputedFeatures) and width is not None:
            self.encoder.set_dim(int(width))
            self._build_mil(int(width))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _trainable(self) -> nn.ModuleList:
        return nn.ModuleList([self.encoder, self.aggregator, self.head])

    def _parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The weights to run: the EMA copy outside training when EMA is on, else the live ones."""
        if self.ema is not None and not self.training:
            enc, agg, head = self.ema.module
            return enc, agg, head
        return self.encoder, self.aggregator, self.head

    def encode(self, images: Tensor, encoder: nn.Module | None = None) -> Tensor:
        """Encode a flat patch batch.

        In training the whole batch goes through at once (the encoder may checkpoint chunks);
        otherwise patches are normalised and encoded ``eval_chunk_size`` at a time so a 10k-patch
        slide never holds more than one chunk of float images.

        Args:
            images: [n, 3, h, w] uint8 RGB or already-normalised float.
            encoder: Which encoder (live or EMA); defaults to the live one.

        Returns:
            [n, D] features.
        """
        encoder = encoder or self.encoder
        if isinstance(encoder, PrecomputedFeatures):
            return encoder(images)
        mean = getattr(encoder, "mean", IMAGENET_MEAN)
        std = getattr(encoder, "std", IMAGENET_STD)
        order = getattr(encoder, "channel_order", "rgb")
        if torch.is_grad_enabled() and self.training and not getattr(encoder, "frozen", False):
            return encoder(normalize_images(images, mean, std, order))
        # A frozen encoder needs no graph even in training: chunking bounds its activations.
        with torch.no_grad() if getattr(encoder, "frozen", False) else contextlib.nullcontext():
            chunks = [
                encoder(normalize_images(c, mean, std, order)) for c in images.split(self.eval_chunk_size)
            ]
        return torch.cat(chunks)

    # ------------------------------------------------------------------------------ input contract
    @property
    def channel_order(self) -> str:
        """Channel order the encoder's weights expect (``rgb`` or ``bgr``), see ``ResNetEncoder``."""
        return str(getattr(self.encoder, "channel_order", "rgb"))

    @property
    def eval_resize(self) -> bool:
        """True when evaluation must feed whole patches resized to the encoder's input size."""
        return bool(getattr(self.encoder, "eval_resize", False))

    def input_contract(self) -> dict[str, object]:
        """What the weights need from their input: ``{"channel_order", "eval_resize"}`` (plain data)."""
        return {"channel_order": self.channel_order, "eval_resize": self.eval_resize}

    def set_input_contract(self, channel_order: str, eval_resize: bool) -> None:
        """Make the live and EMA encoders expect ``channel_order`` and ``eval_resize`` (a checkpoint's)."""
        check_channel_order(channel_order)
        encoders = [self.encoder]
        if self.ema is not None:
            encoders.append(self.ema.module[0])
        for enc in encoders:
            if not isinstance(enc, PrecomputedFeatures):
                enc.channel_order = channel_order
                enc.eval_resize = bool(eval_resize)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Run the whole model on bags.

        Args:
            images: [B, N, 3, h, w] patches: uint8 RGB (normalised here with the encoder's statistics,
                chunk by chunk, on the device: host->device copies stay 4x smaller than float) or float
                already normalised; for a feature model (``PrecomputedFeatures``) features [B, N, D].
            mask: [B, N] bool, False at padding; ``None`` when every patch is real.

        Returns:
            ``outputs`` [B, K] head outputs, ``slide`` [B, D'] slide vectors, ``attention`` [B, H, N].
        """
        b, n = images.shape[:2]
        feats = self.encode_patches(images.flatten(0, 1)).view(b, n, -1)
        return self.aggregate(feats, mask)

    def encode_patches(self, images: Tensor) -> Tensor:
        """Encode a flat patch batch with the weights :meth:`forward` uses (the EMA copy outside training).

        Lets inference encode a slide's patches chunk by chunk (e.g. read from the slide file) and
        aggregate them once with :meth:`aggregate`, which is exactly ``forward`` on the whole bag.

        Args:
            images: [n, 3, h, w] uint8 RGB or normalised float; features [n, D] for a feature model.

        Returns:
            [n, D] features.
        """
        return self.encode(images, self._parts()[0])

    def aggregate(self, feats: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Aggregator and head on encoded bags, with the weights :meth:`forward` uses.

        Args:
            feats: [B, N, D] patch features (from :meth:`encode_patches`).
            mask: [B, N] bool, False at padding; ``None`` when every patch is real.

        Returns:
            ``outputs`` [B, K], ``slide`` [B, D'], ``attention`` [B, H, N] (as :meth:`forward`).
        """
        _, aggregator, head = self._parts()
        slide, attention = aggregator(feats, mask)
        return {"outputs": head(slide), "slide": slide, "attention": attention}

    def setup(self, stage: str) -> None:
        """Fail early when the model's task and the data's task disagree (a YAML slip, not a bug)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        self._check_feature_input(dm, stage)
        data_task, data_k = getattr(dm, "task", None), getattr(dm, "num_classes", None)
        if data_task is not None and data_task != self.task.kind:
            raise ValueError(
                f"model.task is a {self.task.kind} task but data.task is {data_task!r}: make them agree in the config"
            )
        model_k = self.task.num_targets
        if data_k is not None and model_k is not None and int(data_k) != int(model_k):
            what = self.task.num_targets_name
            raise ValueError(
                f"model.task.{what}={model_k} but data.num_classes={data_k}: set both to the same number"
            )

    def _check_feature_input(self, dm: object, stage: str) -> None:
        """Feature runs: remember the training features' settings, refuse others at evaluation."""
        is_feature_model = isinstance(self.encoder, PrecomputedFeatures)
        has_features = hasattr(dm, "feature_dim")
        if is_feature_model != has_features:
            raise ValueError(
                "model.encoder is PrecomputedFeatures but the data are patch images (set data.features_dir)"
                if is_feature_model
                else "the data are precomputed features but model.encoder is a patch encoder: use "
                "`encoder: {class_path: e2e_wsi.models.encoders.PrecomputedFeatures}`"
            )
        if not has_features:
            return
        if (
            self.encoder.out_dim is not None
            and dm.feature_dim is not None
            and self.encoder.out_dim != dm.feature_dim
        ):
            raise ValueError(
                f"the features in {dm.hparams.features_dir} are {dm.feature_dim}-d but the model expects "
                f"{self.encoder.out_dim}-d (model.encoder.init_args.dim): leave `dim` unset so the model "
                "follows the features, or use features from the right encoder"
            )
        settings = getattr(dm, "feature_settings", None)
        if stage == "fit" and self.feature_settings is None:
            self.feature_settings = settings

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What the weights were trained for, so a resume or an evaluation with another task is refused.
        checkpoint["e2e_wsi_task"] = {"kind": str(self.task.kind), "task": type(self.task).__name__}
        if not isinstance(self.encoder, PrecomputedFeatures):
            checkpoint[INPUT_CONTRACT_KEY] = self.input_contract()
        else:
            checkpoint[FEATURES] = {"dim": self.encoder.out_dim, "settings": self.feature_settings}

    def _check_checkpoint_task(self, checkpoint: dict) -> None:
        """The checkpoint's task (recorded since this version) and head shapes must be this model's.

        Raises:
            UserError: Naming both tasks, or the head's shapes for checkpoints without a recorded task.
        """
        saved = checkpoint.get("e2e_wsi_task") or {}
        now = {"kind": str(self.task.kind), "task": type(self.task).__name__}
        advice = (
            "use the config of the checkpoint's own run (RUN/config.yaml), or start a new run without "
            "--ckpt_path"
        )
        if saved and saved != now:
            raise UserError(
                f"the checkpoint was trained for a {saved.get('kind')} task ({saved.get('task')}) but model.task "
                f"here is {now['kind']} ({now['task']}): {advice}"
            )
        if not self.built:
            return
        state = checkpoint.get("state_dict") or {}
        for name, value in self.head.state_dict().items():
            theirs = state.get(f"head.{name}")
            if theirs is not None and tuple(theirs.shape) != tuple(value.shape):
                raise UserError(
                    f"the checkpoint's head.{name} is {tuple(theirs.shape)} but model.task here gives "
                    f"{tuple(value.shape)}: it was trained for another task or number of classes; {advice}"
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Apply the checkpoint's input contract; fit converted EMA keys; build a lazy feature model.

        A checkpoint's ``e2e_wsi_input`` (channel order, evaluation resize) describes its weights and
        wins over the config's encoder settings. A checkpoint written by ``e2e-wsi convert`` gets its
        ``ema.*`` keys filled from (or dropped to) what this model has, so no ``--ema`` flag is needed.
        A checkpoint of another task is refused first.
        """
        self._check_checkpoint_task(checkpoint)
        contract = checkpoint.get(INPUT_CONTRACT_KEY)
        if contract is not None and not isinstance(self.encoder, PrecomputedFeatures):
            if contract != self.input_contract():
                rank_zero_info(
                    f"input contract from the checkpoint: {contract} (config: {self.input_contract()})"
                )
            self.set_input_contract(str(contract["channel_order"]), bool(contract["eval_resize"]))
        if "converted_from" in checkpoint and "state_dict" in checkpoint:
            checkpoint["state_dict"] = self._fit_ema_keys(checkpoint["state_dict"])
        saved = checkpoint.get(FEATURES)
        if saved is None:
            return
        if not self.built:
            self.encoder.set_dim(int(saved["dim"]))
            self._build_mil(int(saved["dim"]))
        elif self.encoder.out_dim != saved["dim"]:
            raise ValueError(
                f"the checkpoint was trained on {saved['dim']}-d features but these features are "
                f"{self.encoder.out_dim}-d: they were made by another encoder"
            )
        trained, now = saved.get("settings"), None
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            now = getattr(dm, "feature_settings", None)
            _compare_settings(trained, now, getattr(dm, "hparams", {}).get("features_dir"))
        if self.feature_settings is None:
            self.feature_settings = trained

    def _fit_ema_keys(self, state: dict) -> dict:
        """Add ``ema.*`` copies of the live weights when this model keeps an EMA, drop them otherwise."""
        from e2e_wsi.models.convert import with_ema_copy  # convert imports nothing from here

        has_ema = any(k.startswith("ema.") for k in state)
        if self.ema is not None and not has_ema:
            return with_ema_copy(state)
        if self.ema is None and has_ema:
            return {k: v for k, v in state.items() if not k.startswith("ema.")}
        return state

    # -------------------------------------------------------------------------------------- training
    def step(self, batch: dict, stage: str) -> dict[str, Tensor]:
        """The one step shared by train, val, test and predict: forward, loss, metrics, logging."""
        inputs = batch["features"] if "features" in batch else batch["images"]
        out = self(inputs, batch.get("mask"))
        bsz = inputs.shape[0]
        if stage == "predict":
            return out
        loss = self.task.loss(self.loss_fn, out["outputs"], batch)
        metrics = getattr(self, f"{stage}_metrics")
        real = real_rows(batch)
        self._update_metrics(metrics, out["outputs"].detach(), batch, real)
        on_step = stage == "train"
        # A padding bag (DDP rank without an evaluation slide) logs with weight 0: it joins the
        # cross-rank reduction without moving the epoch mean. Evaluation batches hold one bag. The
        # weight is a float because Lightning averages the per-rank bag counts in the tensor's dtype,
        # and an integer mean of unequal counts (1 and 0, or 2 and 1) truncates.
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            batch_size=float(real.sum()),  # type: ignore[arg-type]
            sync_dist=not on_step,
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=bsz)
        out["loss"] = loss
        return out

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.step(batch, "train")["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor | dict[str, Tensor]]:
        """Test metrics, and the per-slide predictions for the writer callbacks.

        Returns:
            ``index`` [B] (positions in the evaluation dataset) and ``preds`` (``probs`` [B, K] or
            ``risk`` [B]); :class:`~e2e_wsi.training.callbacks.SlidePredictionWriter` collects them.
        """
        out = self.step(batch, "test")
        return {"index": batch["index"], "preds": self.task.predict(out["outputs"].detach())}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Like :meth:`test_step` without targets, plus ``attention`` [B, H, N]."""
        out = self.step(batch, "predict")
        return {
            "index": batch["index"],
            "preds": self.task.predict(out["outputs"]),
            "attention": out["attention"],
        }

    def _update_metrics(self, metrics, outputs: Tensor, batch: dict, real: Tensor) -> None:
        """Update ``metrics`` with the real rows only (see :func:`real_rows`)."""
        if bool(real.all()):
            self.task.update_metrics(metrics, outputs, batch)
            return
        rows = select_rows(batch, real)
        if bool(real.any()):
            self.task.update_metrics(metrics, outputs[real], rows)
            return
        # Only padding: metrics that gather lists of predictions across ranks get one empty entry of
        # the right shape, so every rank's gather matches; counting metrics sync their zero sums as is.
        for metric in metrics.values():
            if any(isinstance(v, list) for v in metric.metric_state.values()):
                self.task.update_metrics(metric, outputs[real], rows)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self._trainable())

    # ----------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        groups = encoder_param_groups(self.encoder, [self.aggregator, self.head], self.encoder_lr_mult)
        optimizer = self.optimizer_factory(groups)
        apply_lr_mult(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total)
        interval = getattr(scheduler, "interval", "step")  # EpochCosineLR: once per epoch
        if interval == "epoch":
            scheduler.set_epochs(int(self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    @contextmanager
    def evaluating(self) -> Iterator[SlideModule]:
        """Context for inference outside a Trainer: eval mode and no gradients, restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield self
        finally:
            self.train(was_training)


def real_rows(batch: dict) -> Tensor:
    """[B] bool: False for padding bags (``index`` -1), which a DDP rank without an evaluation slide
    runs so it still joins every collective (:class:`e2e_wsi.data.datamodule.EvalShardSampler`)."""
    index = batch.get("index")
    if index is None:
        inputs = batch["features"] if "features" in batch else batch["images"]
        return torch.ones(inputs.shape[0], dtype=torch.bool, device=inputs.device)
    return index >= 0


def select_rows(batch: dict, rows: Tensor) -> dict:
    """The batch restricted to ``rows`` (tensors with a leading batch dimension; other values kept)."""
    n = rows.shape[0]
    return {
        k: v[rows] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v for k, v in batch.items()
    }


def _compare_settings(trained: dict | None, now: dict | None, folder: object) -> None:
    """Refuse evaluating on features made differently from the training features."""
    if trained is None or now is None:
        if trained != now:
            warnings.warn(
                f"cannot check that the features in {folder} come from the encoder the model was trained "
                "on (one side has no e2e-wsi provenance)",
                stacklevel=3,
            )
        return
    keep = ("encoder", "magnification", "patch_size")
    a, b = {k: trained.get(k) for k in keep}, {k: now.get(k) for k in keep}
    if a != b:
        raise ValueError(
            f"the features in {folder} were made differently from the ones this model was trained on "
            f"({describe_difference(a, b)}); extract them with the training encoder and settings"
        )
