"""Pixel conventions shared by the data side and the models: ImageNet statistics, uint8 -> float.

Kept below both ``data`` (whose transforms may normalise) and ``models`` (whose encoders normalise on the
device with their own ``mean``/``std``), so neither imports the other for it.
"""

from __future__ import annotations

from typing import Literal

import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB order
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ChannelOrder = Literal["rgb", "bgr"]
CHANNEL_ORDERS: tuple[str, ...] = ("rgb", "bgr")


def check_channel_order(channel_order: str) -> str:
    """Return ``channel_order`` if it is ``rgb`` or ``bgr``; else raise ValueError saying so."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    return channel_order


def normalize_images(
    images: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    channel_order: ChannelOrder = "rgb",
) -> torch.Tensor:
    """uint8 RGB in [0, 255] -> float32 normalised with the encoder's statistics.

    Args:
        images: uint8 [..., 3, H, W] RGB; float input is assumed to be already normalised and returned
            as is.
        mean: Per-channel mean in [0, 1] units (the encoder's ``mean``; ImageNet by default), applied
            to the channels in the order the encoder receives them.
        std: Per-channel standard deviation in [0, 1] units (the encoder's ``std``).
        channel_order: ``rgb`` (channel 0 = red) or ``bgr``: the channels are reversed first, and
            ``mean``/``std`` are applied to the reversed channels as they are (the official
            pipeline's input: blue minus the red mean, ...).

    Returns:
        float32 [..., 3, H, W].
    """
    if images.dtype != torch.uint8:
        return images
    if check_channel_order(channel_order) == "bgr":
        images = images.flip(-3)
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(3, 1, 1)
    return x.sub_(mean_t).div_(std_t)
