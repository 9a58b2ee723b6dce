"""Measures of the paper's mechanism: where attention goes and where the encoder's gradient comes from.

The paper (sections 3.1-3.3) argues that in end-to-end training a very sparse attention sends the
encoder's gradient to few patches, and to the wrong ones when the attention has locked onto them. These
functions turn that into numbers on one bag, given which patches are lesion (ground truth):

* :func:`top_mass_share`: attention sparsity, the smallest share of patches holding ``mass`` (90%) of
  the attention (1/N when one patch holds it all; ``mass`` when attention is uniform);
* :func:`mass_on`: share of the attention mass on a set of patches (chance = the set's share of
  patches);
* :func:`gradient_share`: share of the encoder's gradient norm that comes from a set of patches, from
  the gradient of the loss w.r.t. the encoder's output features [N, D] (per-patch L2 norms);
* :func:`patch_region_labels`: which patches of a slide lie in a region of a ground-truth mask.

:class:`e2e_wsi.training.mechanism.MechanismProbe` records them during training.
"""

from __future__ import annotations

import numpy as np
import torch

from e2e_wsi.evaluation.localization import patch_lesion_labels

LESION = 255  # mask value of lesion tissue (``e2e-wsi synth`` masks, QuPath-rasterised lesions)


def top_mass_share(att: np.ndarray | torch.Tensor, mass: float = 0.9) -> float:
    """Smallest share of patches whose attention sums to ``mass`` of the total.

    Args:
        att: [N] non-negative attention of one bag (one head or head-averaged).
        mass: Target share of the attention mass, in (0, 1].

    Returns:
        k / N for the smallest k whose top-k attention sum reaches ``mass`` of the total.

    Raises:
        ValueError: If ``att`` is empty or ``mass`` is outside (0, 1].
    """
    w = _as_numpy(att).astype(np.float64).ravel()
    if w.size == 0:
        raise ValueError("attention of an empty bag has no sparsity")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    w = np.sort(w)[::-1]
    cum = np.cumsum(w) / max(float(w.sum()), 1e-12)
    k = int(np.searchsorted(cum, mass - 1e-9) + 1)  # tolerance: float sums of exactly `mass`
    return min(k, w.size) / w.size


def mass_on(att: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Share of the attention mass on the patches where ``labels`` is True.

    Args:
        att: [N] or [H, N] non-negative attention; several heads are averaged first.
        labels: [N] bool.

    Returns:
        A share in [0, 1] (0 when the attention sums to 0).
    """
    a = _as_numpy(att).astype(np.float64)
    a = a.mean(axis=0) if a.ndim == 2 else a
    lab = _as_numpy(labels).astype(bool)
    _check_same_length(a, lab)
    return float(a[lab].sum() / max(float(a.sum()), 1e-12))


def gradient_share(
    grad: torch.Tensor, labels: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray | None = None
) -> tuple[float, float]:
    """Share of the encoder's gradient norm that comes from the labelled patches.

    Args:
        grad: [N, D] gradient of the loss w.r.t. the encoder's output features (one row per patch).
        labels: [N] bool, the patches of interest (e.g. lesion).
        valid: [N] bool, False at padding rows (ignored); ``None`` = every row.

    Returns:
        ``(share, total)``: sum of the labelled rows' L2 norms over the sum of all valid rows' norms
        (0 when the total is 0), and that total (to weight averages over batches).
    """
    norms = grad.detach().float().norm(dim=-1).cpu().numpy().astype(np.float64)
    lab = _as_numpy(labels).astype(bool)
    _check_same_length(norms, lab)
    keep = np.ones_like(lab) if valid is None else _as_numpy(valid).astype(bool)
    total = float(norms[keep].sum())
    return (float(norms[keep & lab].sum()) / total if total > 0 else 0.0), total


def patch_region_labels(
    coords: np.ndarray,
    size_level0: int,
    mask: np.ndarray,
    dimensions: tuple[int, int],
    value: int = LESION,
    min_fraction: float = 0.25,
) -> np.ndarray:
    """Patches at least ``min_fraction`` of whose area has mask value ``value``.

    Args:
        coords: [N, 2] level-0 (x, y) of each patch's top-left corner.
        size_level0: Patch side in level-0 pixels.
        mask: uint8 [h, w] ground truth covering the whole slide.
        dimensions: Level-0 (width, height) of the slide.
        value: The region's mask value (255 lesion; 192 the distractors of ``e2e-wsi synth``).
        min_fraction: Share of the patch that must be in the region (the lesion rule of the heatmaps).

    Returns:
        [N] bool.
    """
    region = np.where(np.asarray(mask) == value, LESION, 0).astype(np.uint8)
    return patch_lesion_labels(np.asarray(coords), int(size_level0), region, dimensions, min_fraction)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_same_length(values: np.ndarray, labels: np.ndarray) -> None:
    if values.shape[-1] != labels.shape[0]:
        raise ValueError(f"{values.shape[-1]} patches but {labels.shape[0]} labels")
