"""Patch transforms on batched uint8 tensors [N, 3, H, W] (RGB).

Geometry (crop, resize, flips) runs on uint8 in the DataLoader worker: it is cheaper than on float and
keeps the tensors crossing process boundaries 4x smaller. Conversion to float and normalisation
with the encoder's own mean/std happen afterwards with :func:`normalize_images`, on the device, chunk by chunk inside
:class:`~e2e_wsi.models.module.SlideModule` (so a 10k-patch evaluation bag never exists as float).

Per-patch randomness: by default every patch gets its own RandomResizedCrop box and flips
(``crop_chunks=None``); ``crop_chunks=k`` draws one box per chunk of the bag, k chunks in all, as the
official GPU transform does per chunk of its batch (torchaug ``SequentialTransform(num_chunks=4)``,
``datasets/data_utils.py:142-149`` of DearCaat/E2E-WSI-ABMILX). The random numbers come from a seed given
by the caller (derived from (seed, epoch, rank, bag index)), so augmentation is reproducible and
independent of the number of workers.

Channel order: images stay RGB everywhere; an encoder trained on BGR input (the official code decodes
its JPEGs with TurboJPEG in BGR, ``datasets/data_utils.py:227-278``, and normalises them with the
RGB-ordered ImageNet statistics without swapping back, ``datasets/data_utils.py:171-174,199-203``)
declares ``channel_order = "bgr"`` and :func:`normalize_images` swaps the channels before normalising.
"""

from __future__ import annotations

import torch
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from e2e_wsi.images import (  # noqa: F401 - re-exported: the pixel conventions live in e2e_wsi.images
    CHANNEL_ORDERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelOrder,
    check_channel_order,
    normalize_images,
)


class TrainTransform:
    """Random flips + RandomResizedCrop (+ optional ColorJitter), uint8 in and out.

    Args:
        size: Output side (the encoder's input size), e.g. 224.
        scale: RandomResizedCrop area range relative to the patch.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: Probability of a horizontal flip per patch.
        vflip: Probability of a vertical flip per patch.
        color_jitter: Opt-in colour augmentation (off by default: the paper found it hurts on H&E).
        jitter_strength: (brightness, contrast, saturation, hue) of the ColorJitter when enabled.
        normalize: Return normalised float32 instead of uint8 (for use without the datamodule hook).
        crop_chunks: ``None``: one crop box per patch. ``k``: the patches are cut into ``k`` consecutive
            chunks (``torch.chunk``) and each chunk shares one box, as the official transform does
            (``img_trans_chunk`` 4, ``options.py:51``; ``datasets/data_utils.py:142-149``, where the
            chunks are of the per-GPU batch; here of one bag). Flips stay per patch (the paper's
            "flipping"; the official ``weak`` transform has none, ``datasets/data_utils.py:131-133``).
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.5,
        color_jitter: bool = False,
        jitter_strength: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 0.02),
        normalize: bool = False,
        crop_chunks: int | None = None,
    ) -> None:
        if crop_chunks is not None and crop_chunks < 1:
            raise ValueError(f"crop_chunks must be None or >= 1, got {crop_chunks}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale {scale} must satisfy 0 < low <= high <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop ratio {ratio} must satisfy 0 < low <= high")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip, self.vflip = float(hflip), float(vflip)
        self.jitter = v2.ColorJitter(*jitter_strength) if color_jitter else None
        self.normalize = normalize
        self.crop_chunks = crop_chunks

    def _groups(self, n: int) -> list[torch.Tensor]:
        """Index groups sharing one crop box: one per patch, or ``crop_chunks`` consecutive chunks."""
        if self.crop_chunks is None:
            return [torch.tensor([i]) for i in range(n)]
        return list(torch.arange(n).chunk(self.crop_chunks))

    def __call__(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Augment a stack of patches.

        Args:
            images: uint8 [N, 3, H, W] RGB.
            seed: Seed of this call's randomness; ``None`` uses torch's global generator as is.

        Returns:
            uint8 [N, 3, size, size] (float32 normalised if ``normalize``).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] patches, got shape {tuple(images.shape)}")
        # torchvision draws crop boxes from the global generator: fork it so a seeded call neither
        # depends on nor disturbs the caller's random state.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = torch.empty((images.shape[0], 3, self.size, self.size), dtype=images.dtype)
            for group in self._groups(images.shape[0]):
                top, left, h, w = RandomResizedCrop.get_params(
                    images[group[0]], list(self.scale), list(self.ratio)
                )
                out[group] = F.resized_crop(
                    images[group], top, left, h, w, [self.size, self.size], antialias=True
                )
            if self.jitter is not None:
                for i in range(images.shape[0]):
                    out[i] = self.jitter(out[i])
            flip_h = torch.rand(images.shape[0]) < self.hflip
            flip_v = torch.rand(images.shape[0]) < self.vflip
        out[flip_h] = out[flip_h].flip(-1)
        out[flip_v] = out[flip_v].flip(-2)
        return normalize_images(out) if self.normalize else out


# The official evaluation sees the whole patch resized to 224 px: its validation/test LMDB is written
# at ``img_size`` 224 with ``v2.Resize((224, 224), antialias=True)`` (CLAM/save_patches.py:50-53; README
# lines 107-108), the test loaders read 224 px images (datasets/dataloader.py:59,79; main.py:545-547) and
# the evaluation PrefetchLoader applies no transform (datasets/dataloader.py:102-103 leave
# ``need_transform`` at its default False, datasets/data_utils.py:100,114). Its ``CenterCrop(224)``
# (datasets/data_utils.py:151-160) is never built.
OFFICIAL_EVAL_CROP_FRACTION = 1.0


class EvalTransform:
    """Centre-crop a fraction of each patch and resize it to the model size, batched, uint8 in and out.

    By default this is the official evaluation geometry (see :data:`OFFICIAL_EVAL_CROP_FRACTION`): the
    whole patch resized to ``size`` (256 -> 224). ``crop_fraction=224/256`` takes the central 224 px of a
    256 px patch unchanged instead (a smaller field of view than training's full-area crops).

    Args:
        size: Output side, e.g. 224.
        resize: Shorter side after resizing, before the centre crop; ``None`` means
            ``round(size / crop_fraction)`` (overrides ``crop_fraction`` when given).
        crop_fraction: Side of the centre crop relative to the patch, in (0, 1].
        normalize: Return normalised float32 instead of uint8.
    """

    def __init__(
        self,
        size: int = 224,
        resize: int | None = None,
        crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
        normalize: bool = False,
    ) -> None:
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"eval crop_fraction must be in (0, 1], got {crop_fraction}")
        self.size = int(size)
        self.resize = int(resize) if resize is not None else round(self.size / crop_fraction)
        if self.resize < self.size:
            raise ValueError(f"eval resize {self.resize} is smaller than the crop size {self.size}")
        self.normalize = normalize

    def __call__(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Args: images uint8 [N, 3, H, W]; seed unused. Returns uint8 [N, 3, size, size]."""
        del seed
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] patches, got shape {tuple(images.shape)}")
        out = images
        if min(images.shape[-2:]) != self.resize:
            out = F.resize(out, [self.resize], antialias=True)
        if tuple(out.shape[-2:]) != (self.size, self.size):
            out = F.center_crop(out, [self.size, self.size])
        out = out.contiguous()
        return normalize_images(out) if self.normalize else out
