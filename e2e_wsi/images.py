"""Pixel conventions shared by the data side and the models: ImageNet statistics, uint8 -> float.

Kept below both ``data`` (whose transforms may normalise) and ``models`` (whose encoders normalise on the
device with their own ``mean``/``std``), so neither imports the other for it.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB order
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize_images(
    images: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 RGB in [0, 255] -> float32 normalised with the encoder's statistics (channel 0 = red).

    Args:
        images: uint8 [..., 3, H, W]; float input is assumed to be already normalised and returned as is.
        mean: Per-channel mean in [0, 1] units (the encoder's ``mean``; ImageNet by default).
        std: Per-channel standard deviation in [0, 1] units (the encoder's ``std``).

    Returns:
        float32 [..., 3, H, W].
    """
    if images.dtype != torch.uint8:
        return images
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(3, 1, 1)
    return x.sub_(mean_t).div_(std_t)
