"""Record the paper's mechanism during end-to-end training (``MechanismProbe`` callback).

Per epoch it writes one JSON line to ``RUN/mechanism.jsonl`` with

* ``train``: over the epoch's MRIS training bags, the share of the encoder's gradient norm that comes
  from lesion (and distractor) patches, their share of the sampled patches (the chance level), and the
  attention mass on them and its sparsity within the sampled bags;
* ``probe``: over every main-magnification patch of the probe split's slides (default the test split),
  attention sparsity (top-90% patch share, per head and head-averaged), attention mass on lesion and
  distractor patches, lesion localisation AUROC, and the slide-level AUROC (two classes) and NLL.

Patches are labelled from ground-truth masks ``<masks_dir>/<slide_id>.png`` (``e2e-wsi synth`` masks:
255 lesion, 192 distractor) with the heatmaps' rule (at least 25% of the patch in the region). The
gradient comes from a tensor hook on the encoder's output features [n, D] in the training forward; it
changes nothing in training. Single-process training only (the probe runs on the local model).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.data.datasets import Bag, EvalBagDataset
from e2e_wsi.data.transforms import EvalTransform
from e2e_wsi.evaluation.mechanism import gradient_share, mass_on, patch_region_labels, top_mass_share
from e2e_wsi.evaluation.metrics import binary_auroc
from e2e_wsi.utils import validate_slide_id

REGIONS = {"lesion": 255, "distractor": 192}


class _Labeller:
    """Region labels of cached patches, looked up by (slide, magnification, level-0 x, y)."""

    def __init__(self, cache: PatchCache, masks_dir: Path, regions: dict[str, int]) -> None:
        self.cache = cache
        self.masks_dir = masks_dir
        self.regions = regions
        self._tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _table(self, slide_id: str, mag: float) -> tuple[np.ndarray, np.ndarray]:
        key = (slide_id, mag_key(mag))
        if key not in self._tables:
            meta = self.cache.meta(slide_id)
            coords = np.asarray(self.cache.coords(slide_id, mag), dtype=np.int64)
            size = int(meta["magnifications"][mag_key(mag)]["size_level0"])
            dims = (int(meta["dimensions"][0]), int(meta["dimensions"][1]))
            path = self.masks_dir / f"{validate_slide_id(slide_id)}.png"
            if not path.is_file():
                raise FileNotFoundError(f"MechanismProbe: no ground-truth mask {path} for slide {slide_id!r}")
            mask = np.asarray(Image.open(path).convert("L"))
            labels = np.stack(
                [patch_region_labels(coords, size, mask, dims, v) for v in self.regions.values()]
            )
            codes = coords[:, 0] * (1 << 32) + coords[:, 1]
            order = np.argsort(codes)
            self._tables[key] = (codes[order], labels[:, order])
        return self._tables[key]

    def label(self, slide_id: str, mag: float, coords: np.ndarray) -> np.ndarray:
        """bool [R, n]: region r of each patch at level-0 ``coords`` [n, 2]."""
        codes, labels = self._table(slide_id, mag)
        want = coords[:, 0].astype(np.int64) * (1 << 32) + coords[:, 1].astype(np.int64)
        pos = np.clip(np.searchsorted(codes, want), 0, len(codes) - 1)
        found = codes[pos] == want
        return labels[:, pos] & found[None, :]

    def batch(self, batch: dict) -> np.ndarray:
        """bool [R, B, N]: region labels of every patch of a training batch (padding False)."""
        coords = batch["coords"].cpu().numpy()
        mags = batch["magnification"].cpu().numpy()
        slide_of = batch["patch_slide"].cpu().numpy()
        valid = batch["mask"].cpu().numpy().astype(bool)
        out = np.zeros((len(self.regions), *valid.shape), dtype=bool)
        for b, slide_ids in enumerate(batch["slide_ids"]):
            for k, slide_id in enumerate(slide_ids):
                for mag in np.unique(mags[b][valid[b]]):
                    sel = valid[b] & (slide_of[b] == k) & (mags[b] == mag)
                    if sel.any():
                        out[:, b, sel] = self.label(slide_id, float(mag), coords[b][sel])
        return out


class MechanismProbe(Callback):
    """Per-epoch attention and gradient measurements against ground-truth lesion masks.

    Args:
        masks_dir: Folder of ``<slide_id>.png`` masks covering each slide (255 lesion, 192 distractor).
        split: Which split's slides the epoch-end probe evaluates on all their main-magnification patches.
        every_n_epochs: Probe every this many epochs (and after the last).
        probe_slides: Probe only the split's first this many slides, except after the last epoch, which
            probes them all (``None``: all every time). Bounds the probe's cost on a CPU.
        file: JSON-lines file written in the run folder (``trainer.default_root_dir``).
        regions: Region name -> mask value; ``lesion`` must be among them.
    """

    def __init__(
        self,
        masks_dir: str,
        split: str = "test",
        every_n_epochs: int = 1,
        probe_slides: int | None = None,
        file: str = "mechanism.jsonl",
        regions: dict[str, int] | None = None,
    ) -> None:
        self.masks_dir = Path(masks_dir)
        self.split = split
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.probe_slides = None if probe_slides is None else max(1, int(probe_slides))
        self.file = file
        self.regions = dict(regions or REGIONS)
        if "lesion" not in self.regions:
            raise ValueError("MechanismProbe regions must include 'lesion'")
        self._handles: list = []
        self._grad: torch.Tensor | None = None
        self._attention: torch.Tensor | None = None
        self._probe_items: list[dict] | None = None

    # ------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        self._labeller = _Labeller(dm._open_source(), self.masks_dir, self.regions)
        self._dm = dm
        self._handles = [
            pl_module.encoder.register_forward_hook(self._on_features),
            pl_module.aggregator.register_forward_hook(self._on_aggregator),
        ]
        self._reset_epoch()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_features(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_tensor(output) and output.requires_grad:

            def keep(grad: torch.Tensor) -> None:
                self._grad = grad.detach()

            output.register_hook(keep)

    def _on_aggregator(self, module: torch.nn.Module, args: tuple, output: tuple) -> None:
        if module.training:
            self._attention = output[1].detach()

    # ----------------------------------------------------------------------------------- training
    def _reset_epoch(self) -> None:
        names = list(self.regions)
        self._sums = {f"grad_{n}": 0.0 for n in names} | {"grad_total": 0.0}
        self._counts = {f"share_{n}": [] for n in names}
        self._train_att: dict[str, list[float]] = {f"att_on_{n}": [] for n in names} | {"top90": []}
        self._losses: list[float] = []
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._grad, self._attention = None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._losses.append(float(loss.detach()))
        labels = self._labeller.batch(batch)  # [R, B, N]
        valid = batch["mask"].cpu().numpy().astype(bool)
        b, n = valid.shape
        for r, name in enumerate(self.regions):
            self._counts[f"share_{name}"].append(float(labels[r][valid].mean()) if valid.any() else 0.0)
        if self._grad is not None:
            grad = self._grad.reshape(b * n, -1)
            for r, name in enumerate(self.regions):
                share, total = gradient_share(grad, labels[r].reshape(-1), valid.reshape(-1))
                self._sums[f"grad_{name}"] += share * total
            self._sums["grad_total"] += gradient_share(grad, valid.reshape(-1), valid.reshape(-1))[1]
        if self._attention is not None:
            att = self._attention.float().cpu().numpy()  # [B, H, N]
            for i in range(b):
                a = att[i][:, valid[i]]
                self._train_att["top90"].append(top_mass_share(a.mean(axis=0)))
                for r, name in enumerate(self.regions):
                    self._train_att[f"att_on_{name}"].append(mass_on(a, labels[r, i][valid[i]]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        total = self._sums["grad_total"]
        row: dict = {"epoch": epoch, "step": int(trainer.global_step)}
        row["train"] = {
            **{
                f"grad_share_{n}": self._sums[f"grad_{n}"] / total if total > 0 else None
                for n in self.regions
            },
            **{k: float(np.mean(v)) if v else None for k, v in self._counts.items()},
            **{k: float(np.mean(v)) if v else None for k, v in self._train_att.items()},
            "loss": float(np.mean(self._losses)) if self._losses else None,
            "seconds": time.perf_counter() - self._t0,
        }
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs == 0 or last:
            t0 = time.perf_counter()
            row["probe"] = self.probe(pl_module, None if last else self.probe_slides)
            row["probe"]["seconds"] = time.perf_counter() - t0
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.file
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        self._reset_epoch()

    # -------------------------------------------------------------------------------------- probe
    def _items(self) -> list[dict]:
        """The probe slides' evaluation bags (all main-magnification patches), built once."""
        if self._probe_items is None:
            dm = self._dm
            bags: list[Bag] = dm._require(self.split)
            transform = EvalTransform(
                int(dm.hparams.eval_patch_size), crop_fraction=dm.hparams.eval_crop_fraction
            )
            dataset = EvalBagDataset(self._labeller.cache, bags, [dm.magnifications[0]], transform)
            self._probe_items = [dataset[i] for i in range(len(dataset))]
            for item, bag in zip(self._probe_items, bags, strict=True):
                item["labels"] = self._labeller.label(
                    bag.slide_ids[0], dm.magnifications[0], item["coords"].numpy()
                )
        return self._probe_items

    def probe(self, pl_module: L.LightningModule, max_slides: int | None = None) -> dict:
        """Attention and predictions of the current model on the probe slides; means over slides.

        Args:
            pl_module: The model (put in eval mode for the probe, then restored).
            max_slides: Only the first this many probe slides (``None``: all).

        Returns:
            Means over slides of the per-slide measures, ``slides``, and over slides ``nll`` and
            ``auroc`` (two classes) of the predictions, plus ``predictions`` (slide id, label, probs).
        """
        rows, probs, targets, preds = [], [], [], []
        for item in self._items()[:max_slides]:
            with pl_module.evaluating():  # eval mode, EMA weights if any, no gradients
                out = pl_module(item["images"][None], item["mask"][None])
            out = {**out, **pl_module.task.predict(out["outputs"])}
            att = out["attention"][0].float().cpu().numpy()  # [H, N]
            lesion = item["labels"][list(self.regions).index("lesion")]
            row = {
                "top90_head": float(np.mean([top_mass_share(a) for a in att])),
                "top90_merged": top_mass_share(att.mean(axis=0)),
                "loc_auroc": _auroc(lesion, att.mean(axis=0)),
            }
            for r, name in enumerate(self.regions):
                row[f"att_on_{name}"] = mass_on(att, item["labels"][r])
                row[f"share_{name}"] = float(item["labels"][r].mean())
            rows.append(row)
            if "probs" in out:
                probs.append(out["probs"][0].float().cpu().numpy())
                targets.append(int(item["target"]))
                preds.append({"slide_id": item["bag_id"], "label": targets[-1], "probs": probs[-1].tolist()})
        summary = {k: _mean([r[k] for r in rows]) for k in rows[0]} if rows else {}
        summary["slides"] = len(rows)
        if probs:
            p = np.stack(probs)
            y = np.asarray(targets)
            summary["nll"] = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)).mean())
            summary["auroc"] = _auroc(y == 1, p[:, 1]) if p.shape[1] == 2 else None
            summary["predictions"] = preds
        return summary


def _auroc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(binary_auroc(positive, scores)[0])


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
