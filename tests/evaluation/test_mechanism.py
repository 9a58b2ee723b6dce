"""Mechanism measures on hand-built tensors: sparsity, attention mass on a region, gradient share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from e2e_wsi.evaluation.mechanism import gradient_share, mass_on, patch_region_labels, top_mass_share


def test_top_mass_share_one_patch_uniform_and_skewed() -> None:
    assert top_mass_share(np.eye(1, 50, 7).ravel()) == pytest.approx(1 / 50)  # one patch holds it all
    assert top_mass_share(np.full(10, 0.1)) == pytest.approx(0.9)  # uniform: 9 of 10 patches
    skewed = torch.tensor([0.2, 0.5, 0.3])  # sorted 0.5, 0.3, 0.2: 80% in 2 patches, 90% needs all 3
    assert top_mass_share(skewed, mass=0.8) == pytest.approx(2 / 3)
    assert top_mass_share(skewed) == pytest.approx(1.0)
    assert top_mass_share(np.array([5.0, 3.0, 2.0]), mass=0.8) == pytest.approx(2 / 3)  # unnormalised


def test_top_mass_share_rejects_empty_and_bad_mass() -> None:
    with pytest.raises(ValueError, match="empty"):
        top_mass_share(np.zeros(0))
    with pytest.raises(ValueError, match="mass"):
        top_mass_share(np.ones(3), mass=1.5)


def test_mass_on_averages_heads_and_matches_by_hand() -> None:
    att = np.array([[0.7, 0.1, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]])  # [H=2, N=4]
    labels = np.array([True, False, False, True])
    # head average: [0.4, 0.1, 0.3, 0.2] -> lesion 0.4 + 0.2
    assert mass_on(att, labels) == pytest.approx(0.6)
    assert mass_on(att[0], labels) == pytest.approx(0.7)
    assert mass_on(np.zeros(4), labels) == 0.0
    with pytest.raises(ValueError, match="4 patches but 3 labels"):
        mass_on(att, labels[:3])


def test_gradient_share_uses_row_norms_and_ignores_padding() -> None:
    grad = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [6.0, 8.0]])  # row norms 5, 1, 0, 10
    lesion = torch.tensor([True, False, False, True])
    share, total = gradient_share(grad, lesion)
    assert total == pytest.approx(16.0)
    assert share == pytest.approx(15 / 16)
    valid = torch.tensor([True, True, True, False])  # the last row is padding
    share, total = gradient_share(grad, lesion, valid)
    assert (share, total) == (pytest.approx(5 / 6), pytest.approx(6.0))
    # Norms, not sums of entries: opposite signs must not cancel.
    share, _ = gradient_share(torch.tensor([[1.0, -1.0], [1.0, 0.0]]), np.array([True, False]))
    assert share == pytest.approx(np.sqrt(2) / (np.sqrt(2) + 1))
    assert gradient_share(torch.zeros(2, 3), np.array([True, False])) == (0.0, 0.0)


def test_gradient_share_of_a_real_backward_pass() -> None:
    """The measure on the gradient autograd gives: only patches the pooling weights receive gradient."""
    feats = torch.randn(5, 4, requires_grad=True)
    weights = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0])  # attention on patches 2 and 3 only
    (weights[:, None] * feats).sum().backward()
    share, _ = gradient_share(feats.grad, np.array([False, False, True, True, False]))
    assert share == pytest.approx(1.0)


def test_patch_region_labels_by_mask_value() -> None:
    # A 1024 x 1024 slide with a mask at downsample 16 (64 x 64): lesion (255) in the top-left
    # 128 x 128 level-0 px, distractor (192) in the next 128 px to the right.
    mask = np.full((64, 64), 128, np.uint8)
    mask[0:8, 0:8] = 255
    mask[0:8, 8:16] = 192
    coords = np.array([[0, 0], [128, 0], [512, 512], [64, 0]])
    lesion = patch_region_labels(coords, 128, mask, (1024, 1024))
    distractor = patch_region_labels(coords, 128, mask, (1024, 1024), value=192)
    assert lesion.tolist() == [True, False, False, True]  # the last patch is half lesion (>= 25%)
    assert distractor.tolist() == [False, True, False, True]
