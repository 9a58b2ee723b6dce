"""Multi-scale random instance sampling (MRIS, paper eq. 2).

For a bag with ``c_j`` patches at magnification j, a sample size s and ratios sigma_j (sum 1), MRIS draws
``s_j = ceil(s * sigma_j)`` patches uniformly without replacement at magnification j.

Rounding: the ceilings can add up to more than s (e.g. s=10, sigma=(0.25, 0.25, 0.5) gives 3+3+5).
The surplus is taken back one patch at a time from the scales that were rounded up the most
(largest ``ceil(x) - x``), ties going to the later scale, so the total is exactly s and the result is
the largest-remainder apportionment of s. It is deterministic (no randomness in the counts).

Small bags: when a scale has fewer than ``s_j`` patches, by default (``shortfall="other_scales"``) the
shortfall is drawn (without replacement) from the patches not yet drawn at the other scales; only when
the whole bag has fewer than s patches are entries repeated, and those repeats are marked
``valid = False`` so batching masks them. ``shortfall="repeat_scale"`` is the official rule: each scale
is sampled on its own and a short scale is padded with random duplicates of its own patches, which
count as real patches (``datasets/data_utils.py:432-437``, ``get_same_psize_img`` with ``pad_enc_bs``;
one call per scale, ``datasets/dataloader.py:67-74``). Example: 200 patches at 10x, 20 at 5x,
s = 128 with ratio 4: official 96 + 32 (12 of them duplicates), ``other_scales`` 108 + 20. A scale
with no patch at all still borrows from the others under both rules.

Seeding: :func:`sample_rng` builds a NumPy generator from ``SeedSequence([seed, epoch, rank, index])``,
one per bag and epoch, so the draw does not depend on the number of DataLoader workers or on which
worker gets the bag, differs across epochs and DDP ranks, and is reproducible.

Epoch handling (MRIS re-draws every epoch): the training loader uses :class:`EpochSampler`, a
``DistributedSampler`` subclass. Lightning calls ``sampler.set_epoch(epoch)`` before every training
epoch (and leaves DistributedSampler subclasses alone under DDP, so no wrapping), and our
``set_epoch`` also writes the epoch into the dataset's shared-memory counter, which persistent workers
read in ``__getitem__``. No ``reload_dataloaders_every_n_epochs`` is needed. Outside Lightning, call
``loader.sampler.set_epoch(e)`` yourself.

Oversampling (``oversample={0: 2, 1: 1}`` = class 0 : class 1 = 2 : 1 per epoch): an explicit index list.
Each class c gets ``t_c`` positions, ``t_c = round(f * w_c)`` with the smallest ``f`` that does not drop
any slide of a weighted class (classes without a weight keep their count). Position p of class c maps to
slide ``perm_epoch[p mod n_c]``, with a fresh permutation per epoch, so every slide appears
``floor(t_c / n_c)`` or ``ceil`` times and the extra copies change each epoch; the sampler then shuffles
and shards the positions across ranks. ``mode="repeat"`` reads the weights as whole repeat counts
instead (``{1: 2}``: every class-1 slide twice per epoch, the others once), the same every epoch, like
the official fixed resampled label file (``labels/subtyping_tcga_brca_resample.csv``: 276 ILC training
rows for 138 slides, i.e. 518:276).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from torch.utils.data import DistributedSampler


class EpochDataset(Protocol):
    """What :class:`EpochSampler` needs of a dataset (e.g. ``TrainBagDataset``): a length and an epoch.

    A protocol rather than an import: ``datasets`` imports this module, not the other way round.
    """

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def check_ratios(ratios: Sequence[float], num_scales: int) -> np.ndarray:
    """Validate MRIS ratios: one per magnification, non-negative, summing to 1.

    Raises:
        ValueError: Saying what is wrong and what was given.
    """
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 1 or len(r) != num_scales:
        raise ValueError(f"mag_ratios {list(ratios)} must have one ratio per magnification ({num_scales})")
    if (r < 0).any() or not np.isfinite(r).all() or not math.isclose(float(r.sum()), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"mag_ratios {list(ratios)} must be non-negative and sum to 1 (they sum to {r.sum():g})"
        )
    return r


def allocate_counts(sample_size: int, ratios: Sequence[float]) -> np.ndarray:
    """Per-scale sample sizes ``ceil(s * sigma_j)`` trimmed to total exactly ``s`` (see module doc).

    Args:
        sample_size: s >= 1.
        ratios: sigma_j, validated with :func:`check_ratios`.

    Returns:
        int64 [t] counts summing to ``sample_size``.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    r = check_ratios(ratios, len(ratios))
    exact = sample_size * r
    # Rounding to 9 decimals first keeps e.g. 10 * 0.3 = 3.0000000000000004 from becoming 4.
    counts = np.ceil(np.round(exact, 9)).astype(np.int64)
    surplus = int(counts.sum()) - sample_size
    if surplus > 0:
        overshoot = counts - exact
        # lexsort: primary key = overshoot (descending), then later scale first.
        order = np.lexsort((-np.arange(len(r)), -np.round(overshoot, 9)))
        take = [j for j in order if counts[j] > 0][:surplus]
        counts[take] -= 1
    assert counts.sum() == sample_size, (counts, sample_size)
    return counts


def sample_rng(seed: int, epoch: int, rank: int, index: int) -> np.random.Generator:
    """The generator of one bag in one epoch on one rank (independent of DataLoader workers)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(rank), int(index)]))


SHORTFALL_RULES = ("other_scales", "repeat_scale")


def mris_sample(
    counts: Sequence[int],
    sample_size: int,
    ratios: Sequence[float],
    rng: np.random.Generator,
    shortfall: str = "other_scales",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one MRIS sample of a bag.

    Args:
        counts: Number of patches available at each magnification, [t].
        sample_size: Total number of entries s.
        ratios: sigma_j, one per magnification, summing to 1.
        rng: From :func:`sample_rng`.
        shortfall: What fills a scale with fewer patches than its share: ``other_scales`` (undrawn
            patches of the other scales) or ``repeat_scale`` (random duplicates of the same scale,
            valid, as the official code does). See the module doc.

    Returns:
        ``(scale, index, valid)``, each of length s: ``scale`` int64 (position in ``counts``), ``index``
        int64 (patch index at that scale), ``valid`` bool (False for repeated padding entries).
        Entries are grouped by scale in order, padding last.

    Raises:
        ValueError: If the bag has no patch at all.
    """
    avail = np.asarray(counts, dtype=np.int64)
    if len(avail) != len(ratios):
        raise ValueError(f"{len(avail)} magnification counts but {len(ratios)} ratios")
    if avail.sum() <= 0:
        raise ValueError("cannot sample a bag with no patches at any magnification")
    if shortfall not in SHORTFALL_RULES:
        raise ValueError(f"shortfall must be one of {SHORTFALL_RULES}, got {shortfall!r}")
    want = allocate_counts(sample_size, ratios)
    taken = np.minimum(want, avail)
    # repeat_scale: a short scale that has patches pads itself with duplicates of its own patches.
    dup = np.where(avail > 0, want - taken, 0) if shortfall == "repeat_scale" else np.zeros_like(want)
    shortfall = int(sample_size - taken.sum() - dup.sum())
    if shortfall > 0:
        # Fill from the undrawn patches of the other scales, uniformly over all of them.
        spare = avail - taken
        extra_draw = rng.choice(int(spare.sum()), size=min(shortfall, int(spare.sum())), replace=False)
        taken = taken + np.bincount(
            np.searchsorted(np.cumsum(spare), extra_draw, side="right"), minlength=len(avail)
        )
    scales = [np.full(int(k + dup[j]), j, dtype=np.int64) for j, k in enumerate(taken)]
    indices = [
        np.concatenate(
            [
                rng.choice(int(avail[j]), size=int(k), replace=False),
                rng.integers(0, max(1, avail[j]), int(dup[j])),
            ]
        )
        for j, k in enumerate(taken)
    ]
    scale = np.concatenate(scales)
    index = np.concatenate(indices).astype(np.int64)
    valid = np.ones(len(scale), dtype=bool)
    pad = sample_size - len(scale)
    if pad > 0:
        # The whole bag is smaller than s: repeat drawn entries and mark the repeats as padding.
        reuse = rng.integers(0, len(scale), size=pad)
        scale = np.concatenate([scale, scale[reuse]])
        index = np.concatenate([index, index[reuse]])
        valid = np.concatenate([valid, np.zeros(pad, dtype=bool)])
    return scale, index, valid


class EpochSampler(DistributedSampler):
    """Shuffling, rank-sharding sampler whose ``set_epoch`` also advances the dataset's MRIS epoch."""

    def __init__(
        self, dataset: EpochDataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.bag_dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.bag_dataset.set_epoch(epoch)


class OversampleMap:
    """Position -> bag index for class oversampling, re-permuted per epoch (see module doc)."""

    def __init__(self, labels: np.ndarray, weights: dict[int, float], seed: int, mode: str = "ratio") -> None:
        if mode not in ("ratio", "repeat"):
            raise ValueError(f"oversample_mode must be 'ratio' or 'repeat', got {mode!r}")
        self.seed = seed
        self.mode = mode
        self.groups: list[np.ndarray] = []
        weighted = {int(c): float(w) for c, w in weights.items()}
        present = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
        if any(w <= 0 for w in weighted.values()) or not set(weighted) <= set(present):
            raise ValueError(
                f"oversample {weights}: weights must be positive and name classes present in the training "
                f"split (classes there: {sorted(present)})"
            )
        if mode == "repeat" and any(w != int(w) for w in weighted.values()):
            raise ValueError(f"oversample {weights} with oversample_mode repeat: give whole repeat counts")
        factor = max(present[c] / w for c, w in weighted.items())
        self.targets: list[int] = []
        for c in sorted(present):
            self.groups.append(np.flatnonzero(labels == c))
            if mode == "repeat":
                self.targets.append(present[c] * int(weighted.get(c, 1)))
            else:
                self.targets.append(max(1, round(factor * weighted[c])) if c in weighted else present[c])
        self.offsets = np.cumsum([0, *self.targets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __call__(self, position: int, epoch: int) -> int:
        g = int(np.searchsorted(self.offsets, position, side="right") - 1)
        members = self.groups[g]
        if self.mode == "repeat":  # every slide its repeat count, the same every epoch
            return int(members[(position - self.offsets[g]) % len(members)])
        perm = np.random.default_rng([self.seed, epoch, g, 0x0DD]).permutation(len(members))
        return int(members[perm[(position - self.offsets[g]) % len(members)]])
