"""Bag datasets over a :class:`~e2e_wsi.cache.store.PatchCache`.

A *bag* is one slide (classification, grading) or all slides of a case (survival). Items are dicts:

* ``bag_id`` (str; the slide id, or the case id for survival bags), ``slide_ids`` (list[str], the slides
  of the bag), ``images`` uint8 [n, 3, h, w] RGB (float32 if the transform normalises), ``mask`` bool [n]
  (False = padding), ``coords`` int64 [n, 2] (level-0 x, y of each patch's top-left),
  ``magnification`` float32 [n], ``patch_slide`` int64 [n] (index into ``slide_ids``),
* targets, as the task spec makes them (:meth:`e2e_wsi.tasks.base.TaskSpec.bag_units`): ``target``
  int64 scalar (class index; survival: discrete time-bin index) or float32 (regression), and for
  survival ``time`` float32 and ``event`` float32 scalars.

:func:`collate_bags` stacks items into ``images`` [B, N, 3, h, w] and ``mask`` [B, N], padding shorter
bags with masked zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from e2e_wsi.data.sampling import check_ratios, mris_sample, sample_rng

PatchTransform = Callable[..., torch.Tensor]  # (uint8 [N,3,H,W], seed) -> [N,3,h,w]


class PatchSource(Protocol):
    """The part of PatchCache the datasets use."""

    def count(self, slide_id: str, mag: float) -> int: ...
    def coords(self, slide_id: str, mag: float) -> np.ndarray: ...
    def get_many(self, slide_id: str, mag: float, indices: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Bag:
    """One training/evaluation unit: its id, its slides and its targets."""

    bag_id: str
    slide_ids: tuple[str, ...]
    targets: Mapping[str, float | int] = field(default_factory=dict)


def _target_tensors(targets: Mapping[str, float | int]) -> dict[str, torch.Tensor]:
    """Scalar tensors of a bag's targets, typed by the task spec that made them: a Python ``int`` becomes
    int64 (class index, time bin), a ``float`` float32 (time, event, a regression target)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in targets.items():
        dtype = torch.int64 if isinstance(value, int | np.integer) else torch.float32
        out[key] = torch.tensor(value, dtype=dtype)
    return out


class _BagReader:
    """Reads patches of a bag, pooled over its slides, scale by scale."""

    def __init__(self, cache: PatchSource, magnifications: Sequence[float]) -> None:
        self.cache = cache
        self.magnifications = [float(m) for m in magnifications]

    def counts(self, bag: Bag) -> np.ndarray:
        """Patches per (scale, slide): int64 [t, n_slides]."""
        return np.array(
            [[self.cache.count(s, m) for s in bag.slide_ids] for m in self.magnifications], dtype=np.int64
        ).reshape(len(self.magnifications), len(bag.slide_ids))

    def read(self, bag: Bag, scale: np.ndarray, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Patches at (scale j, pooled index i) in the given order.

        Returns:
            ``images`` uint8 [n, 3, H, W], ``coords`` int64 [n, 2], ``magnification`` float32 [n],
            ``patch_slide`` int64 [n].
        """
        per_slide = self.counts(bag)
        n = len(scale)
        slide_of = np.empty(n, dtype=np.int64)
        local = np.empty(n, dtype=np.int64)
        for j in range(len(self.magnifications)):
            sel = scale == j
            bounds = np.cumsum(per_slide[j])
            slide_of[sel] = np.searchsorted(bounds, index[sel], side="right")
            local[sel] = index[sel] - np.concatenate([[0], bounds])[slide_of[sel]]
        images: np.ndarray | None = None
        coords = np.empty((n, 2), dtype=np.int64)
        for j, mag in enumerate(self.magnifications):
            for k, slide_id in enumerate(bag.slide_ids):
                sel = np.flatnonzero((scale == j) & (slide_of == k))
                if len(sel) == 0:
                    continue
                # Read each distinct patch once; padding repeats reuse it.
                uniq, inverse = np.unique(local[sel], return_inverse=True)
                patches = self.cache.get_many(slide_id, mag, uniq.tolist())
                if images is None:
                    images = np.empty((n, *patches.shape[1:]), dtype=np.uint8)
                images[sel] = patches[inverse]
                coords[sel] = np.asarray(self.cache.coords(slide_id, mag))[local[sel]]
        assert images is not None
        return {
            "images": torch.from_numpy(images).permute(0, 3, 1, 2),
            "coords": torch.from_numpy(coords),
            "magnification": torch.tensor([self.magnifications[j] for j in scale], dtype=torch.float32),
            "patch_slide": torch.from_numpy(slide_of),
        }


class TrainBagDataset(Dataset):
    """MRIS training bags: ``sample_size`` patches per bag, re-drawn every epoch.

    Args:
        cache: The patch cache (opened lazily in each worker).
        bags: The training bags.
        sample_size: s, patches per bag.
        magnifications: Scales to sample from, e.g. [10, 5, 20].
        mag_ratios: sigma_j per magnification (sum 1); ``None`` = uniform.
        transform: :class:`~e2e_wsi.data.transforms.TrainTransform` (called with a per-bag seed).
        seed: Base seed.
        rank: DDP rank (part of the per-bag seed).
        index_map: Optional callable ``(position, epoch) -> bag index`` used for oversampling; its
            length is given by ``length``.
        length: Number of positions when ``index_map`` is given.
        shortfall: MRIS rule for a scale with too few patches (:func:`~e2e_wsi.data.sampling.mris_sample`).

    The epoch lives in a shared-memory tensor so persistent DataLoader workers see
    :meth:`set_epoch` calls made in the main process.
    """

    def __init__(
        self,
        cache: PatchSource,
        bags: Sequence[Bag],
        sample_size: int,
        magnifications: Sequence[float],
        mag_ratios: Sequence[float] | None,
        transform: PatchTransform,
        seed: int = 0,
        rank: int = 0,
        index_map: Callable[[int, int], int] | None = None,
        length: int | None = None,
        shortfall: str = "other_scales",
    ) -> None:
        if not bags:
            raise ValueError("the training split has no bags")
        self.shortfall = shortfall
        self.bags = list(bags)
        self.sample_size = int(sample_size)
        ratios = mag_ratios if mag_ratios is not None else [1.0 / len(magnifications)] * len(magnifications)
        self.mag_ratios = check_ratios(ratios, len(magnifications))
        self.reader = _BagReader(cache, magnifications)
        self.transform = transform
        self.seed = int(seed)
        self.rank = int(rank)
        self.index_map = index_map
        self.length = len(self.bags) if length is None else int(length)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws ``__getitem__`` returns (visible to running workers)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self.length

    def draw(self, position: int) -> tuple[Bag, np.ndarray, np.ndarray, np.ndarray, int]:
        """The MRIS draw of one position this epoch: (bag, scale, index, valid, transform seed)."""
        epoch = self.epoch
        index = self.index_map(position, epoch) if self.index_map is not None else position
        bag = self.bags[index]
        rng = sample_rng(self.seed, epoch, self.rank, position)
        counts = self.reader.counts(bag).sum(axis=1)
        try:
            scale, idx, valid = mris_sample(counts, self.sample_size, self.mag_ratios, rng, self.shortfall)
        except ValueError as exc:
            raise ValueError(f"bag {bag.bag_id!r} (slides {list(bag.slide_ids)}): {exc}") from exc
        return bag, scale, idx, valid, int(rng.integers(2**62))

    def __getitem__(self, position: int) -> dict[str, Any]:
        bag, scale, idx, valid, tseed = self.draw(position)
        item = self.reader.read(bag, scale, idx)
        item["images"] = self.transform(item["images"], seed=tseed)
        item.update(
            bag_id=bag.bag_id,
            slide_ids=list(bag.slide_ids),
            mask=torch.from_numpy(valid),
            **_target_tensors(bag.targets),
        )
        return item


class EvalBagDataset(Dataset):
    """Every patch of a bag at the evaluation magnification(s), resized/centre-cropped.

    Args:
        cache: The patch cache.
        bags: The bags to evaluate.
        magnifications: Scales to include (default in the datamodule: the main magnification only).
        transform: :class:`~e2e_wsi.data.transforms.EvalTransform`.
    """

    def __init__(
        self,
        cache: PatchSource,
        bags: Sequence[Bag],
        magnifications: Sequence[float],
        transform: PatchTransform,
    ) -> None:
        self.bags = list(bags)
        self.reader = _BagReader(cache, magnifications)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, position: int) -> dict[str, Any]:
        bag = self.bags[position]
        counts = self.reader.counts(bag).sum(axis=1)
        if counts.sum() == 0:
            raise ValueError(
                f"bag {bag.bag_id!r} has no patch at magnifications {self.reader.magnifications}"
            )
        scale = np.repeat(np.arange(len(counts)), counts)
        index = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)
        item = self.reader.read(bag, scale, index)
        item["images"] = self.transform(item["images"])
        item.update(
            index=torch.tensor(position, dtype=torch.int64),
            bag_id=bag.bag_id,
            slide_ids=list(bag.slide_ids),
            mask=torch.ones(len(scale), dtype=torch.bool),
            **_target_tensors(bag.targets),
        )
        return item


def collate_bags(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack bags, padding to the longest with zeros and ``mask = False``.

    Items carry either patches (``images``) or precomputed features (``features``, two-stage MIL; see
    :mod:`e2e_wsi.features.datamodule`); everything else is the same.

    Returns:
        ``images`` [B, N, 3, h, w] (or ``features`` [B, N, D]), ``mask`` bool [B, N], ``coords`` int64
        [B, N, 2], ``magnification`` float32 [B, N], ``patch_slide`` int64 [B, N], target tensors [B],
        ``bag_id`` list[str], ``slide_ids`` list[list[str]].
    """
    inputs = "features" if "features" in items[0] else "images"
    n = max(int(it[inputs].shape[0]) for it in items)
    out: dict[str, Any] = {
        "bag_id": [it["bag_id"] for it in items],
        "slide_ids": [it["slide_ids"] for it in items],
    }
    for key in (inputs, "mask", "coords", "magnification", "patch_slide"):
        first = items[0][key]
        batch = first.new_zeros((len(items), n, *first.shape[1:]))
        for b, it in enumerate(items):
            batch[b, : it[key].shape[0]] = it[key]
        out[key] = batch
    for key, value in items[0].items():  # targets and index: one scalar tensor per bag
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            out[key] = torch.stack([it[key] for it in items])
    return out
