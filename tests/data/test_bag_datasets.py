"""Bag datasets over a real LMDB cache: the right patches, masks, epochs and worker independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.data.datasets import Bag, EvalBagDataset, TrainBagDataset, collate_bags
from e2e_wsi.data.sampling import allocate_counts
from e2e_wsi.data.transforms import EvalTransform, TrainTransform
from tests.helpers.coded_cache import PATCH, CodedCache, patch_colour


def _identity(images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    return images


def _train(
    cache: CodedCache, bags: list[Bag], s: int = 24, transform=_identity, seed: int = 0
) -> TrainBagDataset:
    return TrainBagDataset(PatchCache(cache.path), bags, s, [10.0, 5.0], [0.75, 0.25], transform, seed=seed)


def _bag(slide_id: str, label: int = 0) -> Bag:
    return Bag(slide_id, (slide_id,), {"target": label})


def test_train_item_reads_the_drawn_patches(coded_cache: CodedCache) -> None:
    ds = _train(coded_cache, [_bag("s21", 1)])
    bag, scale, index, valid, _ = ds.draw(0)
    item = ds[0]
    assert item["images"].shape == (24, 3, PATCH, PATCH) and item["images"].dtype == torch.uint8
    assert item["mask"].all() and item["target"].item() == 1 and item["bag_id"] == "s21"
    assert np.bincount(scale).tolist() == allocate_counts(24, [0.75, 0.25]).tolist()
    slide_pos = list(coded_cache.slides).index("s21")
    centre = item["images"][:, :, PATCH // 2, PATCH // 2].int()
    for k in range(24):
        expected = torch.tensor(patch_colour(slide_pos, int(scale[k]), int(index[k])))
        assert (centre[k] - expected).abs().max() <= 3, (k, centre[k], expected)  # JPEG tolerance
    cache = PatchCache(coded_cache.path)
    for k in range(24):
        mag = [10.0, 5.0][scale[k]]
        assert item["magnification"][k].item() == mag
        assert item["coords"][k].tolist() == cache.coords("s21", mag)[index[k]].tolist()


def test_tiny_slide_is_padded_and_masked(coded_cache: CodedCache) -> None:
    item = _train(coded_cache, [_bag("s13")])[0]
    assert item["mask"].sum().item() == 5 and item["mask"].shape == (24,)


def test_epochs_redraw_and_seed_reproduces(coded_cache: CodedCache) -> None:
    ds = _train(coded_cache, [_bag("s50")])
    first = ds.draw(0)[2]
    ds.set_epoch(1)
    second = ds.draw(0)[2]
    ds.set_epoch(0)
    assert np.array_equal(first, ds.draw(0)[2]) and not np.array_equal(first, second)
    assert not np.array_equal(first, _train(coded_cache, [_bag("s50")], seed=1).draw(0)[2])


def test_survival_bag_pools_the_case_slides(coded_cache: CodedCache) -> None:
    bag = Bag("case2", ("s20", "s21"), {"time": 5.0, "event": 1, "target": 2})
    ds = _train(coded_cache, [bag], s=100)
    item = ds[0]
    assert set(item["patch_slide"].tolist()) == {0, 1} and item["slide_ids"] == ["s20", "s21"]
    assert item["mask"].all()  # 40+41 + 12+12 patches >= 100: no padding needed
    assert item["time"].dtype == torch.float32 and item["target"].dtype == torch.int64


def test_workers_do_not_change_the_draws(coded_cache: CodedCache) -> None:
    bags = [_bag(s) for s in ("s00", "s11", "s30", "s41")]
    ds = _train(coded_cache, bags, transform=TrainTransform(24))
    ds.set_epoch(3)

    def run(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(
            ds,
            batch_size=2,
            num_workers=workers,
            collate_fn=collate_bags,
        )
        return [b["images"] for b in loader]

    for a, b in zip(run(0), run(2), strict=True):
        assert torch.equal(a, b)


def test_eval_dataset_returns_all_main_patches(coded_cache: CodedCache) -> None:
    ds = EvalBagDataset(PatchCache(coded_cache.path), [_bag("s31")], [10.0], EvalTransform(16))
    item = ds[0]
    n = coded_cache.slides["s31"][10.0]
    assert item["images"].shape == (n, 3, 16, 16) and item["mask"].all()
    assert torch.equal(item["coords"], torch.from_numpy(PatchCache(coded_cache.path).coords("s31", 10.0)))
    both = EvalBagDataset(PatchCache(coded_cache.path), [_bag("s31")], [10.0, 5.0], EvalTransform(16))[0]
    assert both["images"].shape[0] == n + coded_cache.slides["s31"][5.0]
    assert sorted(set(both["magnification"].tolist())) == [5.0, 10.0]


def test_collate_pads_and_masks() -> None:
    def item(n: int) -> dict:
        return {
            "bag_id": str(n),
            "slide_ids": [str(n)],
            "images": torch.ones(n, 3, 4, 4, dtype=torch.uint8),
            "mask": torch.ones(n, dtype=torch.bool),
            "coords": torch.zeros(n, 2, dtype=torch.int64),
            "magnification": torch.ones(n),
            "patch_slide": torch.zeros(n, dtype=torch.int64),
            "target": torch.tensor(n),
        }

    batch = collate_bags([item(3), item(5)])
    assert batch["images"].shape == (2, 5, 3, 4, 4) and batch["mask"].sum(1).tolist() == [3, 5]
    assert batch["images"][0, 3:].sum() == 0 and batch["target"].tolist() == [3, 5]


def test_empty_training_split_is_an_error(coded_cache: CodedCache) -> None:
    with pytest.raises(ValueError, match="no bags"):
        _train(coded_cache, [])
