"""Stain normalisation (opt-in): Macenko or Reinhard with torchstain, on uint8 RGB tensors.

A :class:`StainNormalizer` holds the *target* statistics, fitted once on a reference image (for
``preprocess --stain_normalization macenko --stain_reference REF.png``), as plain numbers that are
recorded in the cache parameters and so in ``RUN/preprocess.json``: ``predict`` (and an exported
model's ``model.json``) tiles new slides with the same normaliser, as training did.

Each slide is normalised with *its own* statistics, estimated once from the tissue pixels of its
thumbnail (:meth:`StainNormalizer.source_stats`), then every patch is mapped with them
(:meth:`StainNormalizer.apply`). Per-patch estimation (torchstain's ``normalize``) would make one patch's
colours depend on its content (a patch of pure stroma has no haematoxylin to estimate).

* Macenko: the stain matrix and the 99th-percentile concentrations are torchstain's
  ``MacenkoNormalizer.fit``; a patch's optical density is unmixed with the slide's matrix, its
  concentrations scaled by target / slide maxima and remixed with the target matrix (Macenko et al. 2009).
* Reinhard: LAB means and standard deviations (torchstain's ``rgb2lab``); each channel standardised
  with the slide's statistics and rescaled to the target's (Reinhard et al. 2001).

Needs the ``stain`` extra (``pip install 'e2e-wsi[stain]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2e_wsi.errors import UserError

METHODS = ("macenko", "reinhard")
_IO = 240.0  # transmitted light intensity of the Macenko model (torchstain's default)


def _torchstain() -> Any:
    try:
        import torchstain
    except ImportError:
        raise UserError("stain normalisation needs torchstain: pip install 'e2e-wsi[stain]'") from None
    return torchstain


def _as_image(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [3, H, W] from [3, H, W], [H, W, 3] or a pixel list [K, 3]."""
    t = torch.as_tensor(np.asarray(pixels))
    if t.dtype != torch.uint8:
        raise UserError(f"stain normalisation needs uint8 RGB pixels, got {t.dtype}")
    if t.dim() == 2 and t.shape[1] == 3:
        return t.T.reshape(3, 1, -1).contiguous()
    if t.dim() == 3 and t.shape[0] == 3:
        return t
    if t.dim() == 3 and t.shape[-1] == 3:
        return t.permute(2, 0, 1).contiguous()
    raise UserError(f"stain normalisation needs RGB pixels, got shape {tuple(t.shape)}")


@dataclass(frozen=True)
class StainNormalizer:
    """Target statistics of one stain normalisation method.

    Attributes:
        method: ``macenko`` or ``reinhard``.
        target: Macenko: ``stain_matrix`` [3][2] and ``max_concentrations`` [2]; Reinhard: ``means`` [3]
            and ``stds`` [3] in LAB. Plain lists (JSON).
        reference: Where the target came from (a file name), for provenance only.
    """

    method: str
    target: dict[str, list] = field(default_factory=dict)
    reference: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"stain normalisation {self.method!r}: choose one of {', '.join(METHODS)}")

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, method: str, pixels: torch.Tensor | np.ndarray, reference: str = "") -> StainNormalizer:
        """Target statistics from reference pixels (uint8 RGB, any of the layouts of ``_as_image``)."""
        cls(method)  # validates the method name first
        return cls(method, _statistics(method, _as_image(pixels)), reference)

    @classmethod
    def from_image_file(cls, method: str, path: str | Path) -> StainNormalizer:
        """Target statistics from a reference image file (PNG/JPEG/TIFF of representative tissue)."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"stain reference {path}: cannot read it as an image ({err})") from None
        try:
            return cls.fit(method, pixels, reference=path.name)
        except (RuntimeError, IndexError, ValueError) as err:
            raise UserError(
                f"stain reference {path}: no stain statistics could be estimated ({err}); use an image of "
                "stained tissue, not background"
            ) from None

    @classmethod
    def from_options(cls, method: str, reference: str | Path | None) -> StainNormalizer | None:
        """The command-line pair ``--stain_normalization M --stain_reference IMG`` (``none``: ``None``).

        Raises:
            UserError: A reference without a method, or a method without a reference.
        """
        if method == "none":
            if reference is not None:
                raise UserError("--stain_reference needs --stain_normalization macenko or reinhard")
            return None
        if reference is None:
            raise UserError(f"--stain_normalization {method} needs --stain_reference IMAGE")
        return cls.from_image_file(method, reference)

    def source_stats(self, pixels: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """A slide's own statistics, from its tissue pixels (e.g. the thumbnail under the tissue mask)."""
        stats = _statistics(self.method, _as_image(pixels))
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()}

    # ----------------------------------------------------------------- applying
    def apply(self, images: torch.Tensor, source: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalise patches of one slide.

        Args:
            images: uint8 [N, 3, H, W] RGB.
            source: The slide's statistics (:meth:`source_stats`); ``None``: estimated from ``images``.

        Returns:
            uint8 [N, 3, H, W].
        """
        if images.numel() == 0:
            return images
        n, _, h, w = images.shape
        mosaic = images.permute(1, 0, 2, 3).reshape(3, n * h, w)
        if source is None:
            source = self.source_stats(mosaic)
        target = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.target.items()}
        if self.method == "macenko":
            out = _macenko(mosaic, source, target)
        else:
            out = _reinhard(mosaic, source, target)
        return out.reshape(3, n, h, w).permute(1, 0, 2, 3).contiguous()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` with statistics estimated from the images themselves (one bag = one slide)."""
        return self.apply(images)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (cache parameters, ``preprocess.json``, ``model.json``)."""
        return {"method": self.method, "target": self.target, "reference": self.reference}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainNormalizer:
        """Inverse of :meth:`to_dict`."""
        return cls(
            str(data["method"]),
            {k: list(v) for k, v in data["target"].items()},
            str(data.get("reference", "")),
        )


def _statistics(method: str, image: torch.Tensor) -> dict[str, list]:
    torchstain = _torchstain()
    if method == "macenko":
        fitter = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        fitter.fit(image, Io=_IO)
        return {"stain_matrix": fitter.HERef.tolist(), "max_concentrations": fitter.maxCRef.tolist()}
    from torchstain.torch.utils.rgb2lab import rgb2lab
    from torchstain.torch.utils.split import lab_split

    channels = lab_split(rgb2lab(image.float() / 255.0))
    return {"means": [float(c.mean()) for c in channels], "stds": [float(c.std()) for c in channels]}


def _macenko(
    image: torch.Tensor, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> torch.Tensor:
    """uint8 [3, H, W] unmixed with the slide's stains and remixed with the target's."""
    c, h, w = image.shape
    od = -torch.log((image.reshape(3, -1).float() + 1.0) / _IO)  # [3, P] optical density
    conc = torch.linalg.lstsq(source["stain_matrix"], od).solution  # [2, P]
    conc = conc * (target["max_concentrations"] / source["max_concentrations"]).unsqueeze(-1)
    out = _IO * torch.exp(-target["stain_matrix"] @ conc)
    return out.clamp(0, 255).round().to(torch.uint8).reshape(c, h, w)


def _reinhard(
    image: torch.Tensor, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> torch.Tensor:
    """uint8 [3, H, W] with each LAB channel moved from the slide's mean/std to the target's."""
    from torchstain.torch.utils.lab2rgb import lab2rgb
    from torchstain.torch.utils.rgb2lab import rgb2lab
    from torchstain.torch.utils.split import lab_merge, lab_split

    channels = lab_split(rgb2lab(image.float() / 255.0))
    moved = [
        (x - source["means"][i]) / source["stds"][i].clamp_min(1e-6) * target["stds"][i] + target["means"][i]
        for i, x in enumerate(channels)
    ]
    rgb = lab2rgb(lab_merge(*moved)).permute(2, 0, 1)  # torchstain returns [H, W, 3]
    return (rgb * 255.0).clamp(0, 255).round().to(torch.uint8).contiguous()
