"""Feature extraction on several devices: a Lightning ``Trainer.predict`` loop, one process per device.

Each rank encodes whole slides (never a slide split across ranks) and writes them itself with the same
per-slide code as the single-process path (:class:`~e2e_wsi.features.extract.ExtractionPlan`), so files,
resume and failures behave the same. Slides are shared out by patch count (largest first, each to the
least-loaded rank) from rank 0's plan, broadcast before any rank writes: a rank launched later cannot see
a different set of finished slides. After the loop the summary rows are gathered and rank 0 writes
``summary.json``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from e2e_wsi.features.plan import ExtractConfig, ExtractionPlan, SlideAssembler, _Chunks
from e2e_wsi.images import IMAGENET_MEAN, IMAGENET_STD, normalize_images

_PRECISION = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def share_slides(
    jobs: Sequence[tuple[str, float, int]], world: int, rank: int
) -> list[tuple[str, float, int]]:
    """The jobs of one rank: whole slides, balanced by patch count (largest first to the least loaded).

    Args:
        jobs: ``(slide_id, magnification, number of patches)`` of every slide to encode.
        world: Number of ranks.
        rank: This rank.

    Returns:
        This rank's jobs in slide-id order; over all ranks every job appears exactly once.
    """
    loads = [0] * world
    mine = []
    for job in sorted(jobs, key=lambda j: (-j[2], j[0])):
        target = loads.index(min(loads))
        loads[target] += job[2]
        if target == rank:
            mine.append(job)
    return sorted(mine)


class PatchEncoderModule(pl.LightningModule):
    """Wraps a patch encoder for ``Trainer.predict``: normalises uint8 patches, returns float features.

    Precision (autocast) comes from the ``Trainer``; the loop runs in eval mode under inference mode.

    Args:
        encoder: Patch encoder ([N, 3, H, W] -> [N, D]), with ``mean``/``std`` when not ImageNet's.
        plan: The extraction (cache, jobs, input size), rank 0's jobs replacing the others' at setup.
        batch_size: Patches per forward pass.
        num_workers: DataLoader workers decoding patches.
    """

    def __init__(self, encoder: nn.Module, plan: ExtractionPlan, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.mean = tuple(getattr(encoder, "mean", IMAGENET_MEAN))
        self.std = tuple(getattr(encoder, "std", IMAGENET_STD))
        self.plan = plan
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank_jobs: list[tuple[str, float, int]] = []

    def setup(self, stage: str) -> None:
        # Every rank encodes from rank 0's list of unfinished slides (see the module docstring).
        self.plan.jobs = list(self.trainer.strategy.broadcast(self.plan.jobs, src=0))
        self.rank_jobs = share_slides(self.plan.jobs, self.trainer.world_size, self.trainer.global_rank)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            _Chunks(self.plan.cache, self.rank_jobs, self.batch_size, self.plan.input_size),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def predict_step(self, item: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One batch of one slide -> ``features`` [b, D] float32 on the CPU, or the ``error`` it raised."""
        out = {"slide_id": item["slide_id"], "last": item["last"], "features": None, "error": item["error"]}
        if not out["error"]:
            try:
                order = getattr(
                    self.encoder, "channel_order", "rgb"
                )  # a converted official encoder wants BGR
                x = normalize_images(item["images"], self.mean, self.std, order)
                out["features"] = self.encoder(x).float().cpu()
            except Exception as err:  # a bad batch fails its slide only
                out["error"] = repr(err)
        return out


class SlideFeatureWriter(Callback):
    """Writes each slide of this rank as soon as its last batch is encoded (atomically, with provenance).

    A prediction writer on ``on_predict_batch_end``; not a ``BasePredictionWriter``, which wants batch
    indices that a loader of ready-made batches (``batch_size=None``) does not have.

    Args:
        plan: The extraction whose :meth:`~e2e_wsi.features.extract.ExtractionPlan.record` writes slides.
    """

    def __init__(self, plan: ExtractionPlan) -> None:
        super().__init__()
        self.plan = plan
        self.slides = SlideAssembler()
        self.results: list[dict[str, Any]] = []

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        done = self.slides.add(
            prediction["slide_id"], prediction["last"], prediction["features"], prediction["error"]
        )
        if done is None:
            return
        slide_id, feats, seconds, error = done
        count = next(n for s, _, n in pl_module.rank_jobs if s == slide_id)
        self.results.append(dict(self.plan.record(slide_id, feats, seconds, error, count)))


def _lightning_precision(config: ExtractConfig, accelerator: str) -> str:
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if config.precision == "16" and on_cpu:
        warnings.warn("precision 16 needs a CUDA GPU; extracting in 32-bit", stacklevel=3)
        return _PRECISION["32"]
    return _PRECISION[config.precision]


def extract_on_devices(
    plan: ExtractionPlan, encoder: nn.Module, config: ExtractConfig
) -> list[dict[str, Any]]:
    """Run ``plan`` with a Lightning ``Trainer(devices=config.devices, strategy="ddp")`` predict loop.

    Every rank returns the gathered rows of all slides; rank 0 also writes the summary file.
    """
    module = PatchEncoderModule(encoder.eval(), plan, config.batch_size, config.num_workers)
    writer = SlideFeatureWriter(plan)
    try:
        trainer = pl.Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy="ddp" if config.devices > 1 else "auto",
            precision=_lightning_precision(config, config.accelerator),  # type: ignore[arg-type]
            callbacks=[writer],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=config.progress,
            use_distributed_sampler=False,  # the module shares out whole slides itself
        )
    except MisconfigurationException as err:  # e.g. more devices than the machine has
        raise ValueError(f"--devices {config.devices} --accelerator {config.accelerator}: {err}") from None
    trainer.predict(module, return_predictions=False)
    for rows in _gather(writer.results):
        for row in rows:
            plan.rows[row["slide_id"]].update(row)
    if trainer.is_global_zero:
        ordered = plan.finish()
    else:
        ordered = [plan.rows[s] for s in plan.slide_ids]
    trainer.strategy.barrier("summary")  # no rank returns before the summary is written
    return ordered


def _gather(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every rank's rows, on every rank (plain JSON-able dicts through ``all_gather_object``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [rows]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, rows)
    return out
