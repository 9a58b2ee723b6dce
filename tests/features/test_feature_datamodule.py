"""Feature bags: full by default, optional sampling cap, padding with masks for batches > 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from e2e_wsi.data.datasets import Bag, collate_bags
from e2e_wsi.features.datamodule import FeatureBagDataset
from e2e_wsi.features.store import FeatureFolder, write_slide


def _folder(tmp_path: Path) -> FeatureFolder:
    rng = np.random.default_rng(0)
    for slide, n in (("a", 7), ("b", 3), ("c", 5)):
        write_slide(tmp_path, slide, rng.normal(size=(n, 4)), np.arange(2 * n).reshape(n, 2), None)
    return FeatureFolder(tmp_path)


def test_full_bags_pooled_over_a_cases_slides_and_padded(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    bags = [Bag("a", ("a",), {"target": 1}), Bag("case", ("b", "c"), {"target": 0})]
    items = [FeatureBagDataset(folder, bags, 10.0, None)[i] for i in range(2)]
    assert items[0]["features"].shape == (7, 4) and items[1]["features"].shape == (8, 4)
    assert items[1]["patch_slide"].tolist() == [0] * 3 + [1] * 5
    batch = collate_bags(items)
    assert batch["features"].shape == (2, 8, 4) and batch["mask"].sum(1).tolist() == [7, 8]
    assert not batch["features"][0, 7:].any() and batch["target"].tolist() == [1, 0]
    assert torch.equal(batch["coords"][0, :7], torch.from_numpy(folder.read("a")[1]))
    assert (batch["magnification"][0, :7] == 10.0).all()


def test_sampling_cap_keeps_feature_coordinate_pairs(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    full_f, full_c = folder.read("a")
    item = FeatureBagDataset(folder, [Bag("a", ("a",), {"target": 0})], 10.0, max_instances=3)[0]
    assert item["features"].shape == (3, 4) and item["mask"].all()
    rows = [int(np.flatnonzero((full_c == c.numpy()).all(1))[0]) for c in item["coords"]]
    np.testing.assert_array_equal(item["features"].numpy(), full_f[rows])  # rows stay aligned
