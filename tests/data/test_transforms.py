"""Augmentation and normalisation on uint8 batches; RGB channel order."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from e2e_wsi.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    normalize_images,
)


def _patches(n: int = 16, size: int = 64) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_pure_red_is_red_in_channel_zero() -> None:
    red = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    for transform in (TrainTransform(24, normalize=True), EvalTransform(24, normalize=True)):
        out = transform(red, seed=0)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 24, 24)
        means = out.mean(dim=(0, 2, 3))
        assert means[0] > 2.0 and means[1] < -1.5 and means[2] < -1.5  # (1-.485)/.229, -.456/.224, -.406/.225


def test_normalize_matches_imagenet_stats() -> None:
    x = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    out = normalize_images(x)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-6)


def test_train_transform_shape_dtype_and_per_patch_randomness() -> None:
    same = _patches(1).expand(32, -1, -1, -1).contiguous()  # 32 copies of one patch
    out = TrainTransform(48)(same, seed=1)
    assert out.dtype == torch.uint8 and out.shape == (32, 3, 48, 48)
    distinct = {bytes(o.numpy().tobytes()) for o in out}
    assert len(distinct) > 16  # crops/flips differ between patches of one call


def test_train_transform_seeded_and_leaves_global_rng_alone() -> None:
    x = _patches()
    t = TrainTransform(48)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = t(x, seed=7)
    after = torch.rand(1)
    assert torch.equal(a, t(x, seed=7)) and not torch.equal(a, t(x, seed=8))
    assert torch.equal(before, after)


def test_flip_only_transform_flips() -> None:
    x = _patches(4, 16)
    t = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, vflip=0.0)
    assert torch.equal(t(x, seed=0), x.flip(-1))


def test_color_jitter_off_by_default_keeps_colours() -> None:
    flat = torch.full((4, 3, 32, 32), 100, dtype=torch.uint8)
    flat[:, 1] = 50
    assert torch.equal(TrainTransform(16)(flat, seed=0), flat[:, :, :16, :16])
    jittered = TrainTransform(16, color_jitter=True, jitter_strength=(0.5, 0.5, 0.5, 0.1))(flat, seed=0)
    assert not torch.equal(jittered, flat[:, :, :16, :16])


def test_eval_transform_resizes_and_centre_crops() -> None:
    x = _patches(3, 64)
    out = EvalTransform(32, crop_fraction=1.0)(x)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    crop = EvalTransform(32, resize=64)(x)
    assert torch.equal(crop, x[:, :, 16:48, 16:48])


def test_eval_default_is_the_official_whole_patch_resize_not_a_centre_crop() -> None:
    # Official evaluation: the whole 256 px patch resized to 224 (CLAM/save_patches.py:50-53), no crop.
    x = _patches(2, 256)
    out = EvalTransform(224)(x)
    assert torch.equal(out, F.resize(x, [224, 224], antialias=True))
    # crop_fraction=224/256 is the central 224 px unchanged: a different image.
    crop = EvalTransform(224, crop_fraction=224 / 256)(x)
    assert torch.equal(crop, x[:, :, 16:240, 16:240]) and not torch.equal(crop, out)
    assert torch.equal(
        EvalTransform(32, crop_fraction=0.5)(_patches(1, 64)), _patches(1, 64)[:, :, 16:48, 16:48]
    )
    with pytest.raises(ValueError, match="crop_fraction"):
        EvalTransform(224, crop_fraction=1.5)


def test_bgr_normalisation_reverses_channels_before_the_rgb_statistics() -> None:
    x = _patches(2, 8)
    ref = (x.flip(1).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(normalize_images(x, channel_order="bgr"), ref)
    assert not torch.allclose(normalize_images(x), ref)
    with pytest.raises(ValueError, match="channel_order"):
        normalize_images(x, channel_order="brg")  # type: ignore[arg-type]


def test_crop_chunks_share_one_box_per_chunk() -> None:
    # Identical patches: one box per chunk gives identical crops within a chunk (flips off).
    x = _patches(1, 64).expand(8, -1, -1, -1).contiguous()
    chunked = TrainTransform(32, scale=(0.1, 0.5), hflip=0, vflip=0, crop_chunks=2)(x, seed=3)
    assert all(torch.equal(chunked[i], chunked[0]) for i in range(4))
    assert all(torch.equal(chunked[i], chunked[4]) for i in range(4, 8))
    assert not torch.equal(chunked[0], chunked[4])
    per_patch = TrainTransform(32, scale=(0.1, 0.5), hflip=0, vflip=0)(x, seed=3)
    assert not all(torch.equal(per_patch[i], per_patch[0]) for i in range(4))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(224, scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="N, 3, H, W"):
        TrainTransform(224)(torch.zeros(3, 8, 8, dtype=torch.uint8))
