"""MRIS: counts per scale, no duplicates, fills and padding, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_wsi.data.sampling import allocate_counts, check_ratios, mris_sample, sample_rng


@pytest.mark.parametrize(
    ("s", "ratios"),
    [
        (512, [0.5, 0.25, 0.25]),
        (10, [0.25, 0.25, 0.5]),
        (7, [1 / 3, 1 / 3, 1 / 3]),
        (10, [0.7, 0.3]),
        (1, [0.5, 0.5]),
        (128, [0.6, 0.2, 0.2]),
        (33, [1.0]),
    ],
)
def test_allocate_counts_sum_to_s_and_stay_within_one_of_ceil(s: int, ratios: list[float]) -> None:
    counts = allocate_counts(s, ratios)
    exact = s * np.asarray(ratios)
    assert counts.sum() == s
    # Each count is ceil(s*sigma) or one less (the surplus removal), never more.
    assert np.all(counts <= np.ceil(np.round(exact, 9))) and np.all(counts >= np.floor(np.round(exact, 9)))


def test_allocate_counts_exact_ratios_are_exact() -> None:
    assert allocate_counts(512, [0.5, 0.25, 0.25]).tolist() == [256, 128, 128]
    assert allocate_counts(10, [0.7, 0.3]).tolist() == [7, 3]  # 10*0.3 must not round up to 4


@pytest.mark.parametrize("ratios", [[0.5, 0.4], [0.5, 0.6], [-0.1, 1.1], [1.0, 0.0, 0.0, 0.0, 0.0]])
def test_bad_ratios_are_rejected(ratios: list[float]) -> None:
    with pytest.raises(ValueError, match="mag_ratios"):
        check_ratios(ratios, 3)


@pytest.mark.parametrize(
    ("s", "ratios"), [(512, [0.5, 0.25, 0.25]), (100, [0.6, 0.4]), (64, [0.2, 0.3, 0.5])]
)
def test_sample_counts_per_scale_and_no_duplicates(s: int, ratios: list[float]) -> None:
    counts = [5000, 1300, 400][: len(ratios)]
    scale, index, valid = mris_sample(counts, s, ratios, sample_rng(0, 0, 0, 3))
    assert len(scale) == len(index) == len(valid) == s and valid.all()
    assert np.bincount(scale, minlength=len(ratios)).tolist() == allocate_counts(s, ratios).tolist()
    for j, c in enumerate(counts):
        at_j = index[scale == j]
        assert len(np.unique(at_j)) == len(at_j) and (at_j >= 0).all() and (at_j < c).all()


def test_short_scale_is_filled_from_other_scales_without_repeats() -> None:
    counts = [600, 10, 50]  # scale 1 wants 128 but has 10, scale 2 wants 128 but has 50
    scale, index, valid = mris_sample(counts, 512, [0.5, 0.25, 0.25], sample_rng(1, 0, 0, 0))
    assert valid.all() and len(scale) == 512
    per = np.bincount(scale, minlength=3)
    assert per[1] == 10 and per[2] == 50 and per.sum() == 512 and (per <= np.asarray(counts)).all()
    pairs = set(zip(scale.tolist(), index.tolist(), strict=True))
    assert len(pairs) == 512  # no (scale, index) drawn twice


def test_tiny_bag_is_padded_and_masked() -> None:
    counts = [20, 5]
    scale, index, valid = mris_sample(counts, 64, [0.5, 0.5], sample_rng(2, 0, 0, 0))
    assert len(scale) == 64 and valid.sum() == 25
    real = set(zip(scale[valid].tolist(), index[valid].tolist(), strict=True))
    assert len(real) == 25  # every patch exactly once among the valid entries
    pads = set(zip(scale[~valid].tolist(), index[~valid].tolist(), strict=True))
    assert pads <= real  # padding only repeats real patches


def test_empty_bag_raises() -> None:
    with pytest.raises(ValueError, match="no patches"):
        mris_sample([0, 0], 8, [0.5, 0.5], sample_rng(0, 0, 0, 0))


def _draw(seed: int, epoch: int, rank: int, index: int) -> np.ndarray:
    scale, idx, _ = mris_sample([4000, 1000], 128, [0.75, 0.25], sample_rng(seed, epoch, rank, index))
    return np.stack([scale, idx])


def test_seeding_reproducible_and_varies_by_epoch_rank_and_bag() -> None:
    base = _draw(0, 0, 0, 0)
    assert np.array_equal(base, _draw(0, 0, 0, 0))
    for other in (_draw(0, 1, 0, 0), _draw(0, 0, 1, 0), _draw(0, 0, 0, 1), _draw(1, 0, 0, 0)):
        assert not np.array_equal(base, other)


def test_repeat_scale_pads_a_short_scale_with_its_own_duplicates() -> None:
    # The example: 200 patches at 10x, 20 at 5x, s = 128 with ratio 4 (official 96 + 32).
    scale, index, valid = mris_sample([200, 20], 128, [0.75, 0.25], sample_rng(0, 0, 0, 0), "repeat_scale")
    assert np.bincount(scale).tolist() == [96, 32] and valid.all()  # duplicates count, as officially
    sub = index[scale == 1]
    assert set(sub.tolist()) == set(range(20)) and len(sub) - len(set(sub.tolist())) == 12
    assert len(set(index[scale == 0].tolist())) == 96  # the full scale is drawn without repeats
    # Our default borrows the shortfall from the other scale instead: 108 + 20, no repeats.
    scale, index, valid = mris_sample([200, 20], 128, [0.75, 0.25], sample_rng(0, 0, 0, 0))
    assert np.bincount(scale).tolist() == [108, 20] and valid.all()
    with pytest.raises(ValueError, match="shortfall"):
        mris_sample([200, 20], 128, [0.75, 0.25], sample_rng(0, 0, 0, 0), "nearest")


def test_repeat_oversampling_is_exact_and_the_same_every_epoch() -> None:
    from e2e_wsi.data.sampling import OversampleMap

    labels = np.array([0] * 7 + [1] * 3)
    fixed = OversampleMap(labels, {1: 2}, seed=0, mode="repeat")
    assert len(fixed) == 7 + 6
    for epoch in (0, 1, 5):
        drawn = np.bincount([fixed(p, epoch) for p in range(len(fixed))], minlength=10)
        assert drawn[:7].tolist() == [1] * 7 and drawn[7:].tolist() == [2, 2, 2]
    # The ratio mode rotates which slides repeat: 7:3 at 2:1 -> 7 + 4 positions, copies differ by epoch.
    rotating = OversampleMap(labels, {0: 2, 1: 1}, seed=0)
    epochs = [tuple(rotating(p, e) for p in range(len(rotating))) for e in range(4)]
    assert len(rotating) == 11 and len(set(epochs)) > 1
    with pytest.raises(ValueError, match="whole repeat counts"):
        OversampleMap(labels, {1: 1.5}, seed=0, mode="repeat")
