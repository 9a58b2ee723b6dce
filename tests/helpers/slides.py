"""Test slides: synthetic ones with an exactly known tissue mask (the project's TIFF writer), and a real one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2e_wsi.slides.writer import write_pyramidal_tiff

MASK_DS = 16  # truth masks are given at downsample 16 (as synth's masks/<id>.png)


@dataclass(frozen=True)
class TestSlide:
    """A written slide and its truth.

    Attributes:
        path: The .svs file.
        mask: bool [H / 16, W / 16] tissue truth at downsample 16.
        mpp: Level-0 um/px written in the file (None for a slide without metadata).
    """

    __test__ = False  # a data holder, not a pytest test class

    path: Path
    mask: np.ndarray
    mpp: float | None


def tissue_image(size: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image: an ellipse of textured pink/purple tissue with a round hole, and a square
    of tissue, on noisy white glass. Returns (image uint8 [size, size, 3], truth mask bool [size/16]*2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ellipse = ((xx - 0.4) / 0.28) ** 2 + ((yy - 0.45) / 0.35) ** 2 < 1.0
    hole = ((xx - 0.4) / 0.08) ** 2 + ((yy - 0.45) / 0.08) ** 2 < 1.0
    square = (xx > 0.75) & (xx < 0.92) & (yy > 0.70) & (yy < 0.90)
    tissue = (ellipse & ~hole) | square
    image = np.empty((size, size, 3), np.uint8)
    image[...] = (242, 242, 244)
    texture = (np.sin(xx * 300) * np.cos(yy * 260) * 40).astype(np.int16)
    pink = np.array([205, 120, 170], np.int16) + texture[..., None] * np.array([1, 1, 0.5]).astype(np.int16)
    image[tissue] = np.clip(pink[tissue], 0, 255).astype(np.uint8)
    image = np.clip(image.astype(np.int16) + rng.integers(-4, 5, image.shape, dtype=np.int16), 0, 255).astype(
        np.uint8
    )
    small = tissue.reshape(size // MASK_DS, MASK_DS, size // MASK_DS, MASK_DS).mean(axis=(1, 3)) > 0.5
    return image, small


def make_tissue_slide(path: Path, size: int = 4096, seed: int = 0, mpp: float | None = 0.5) -> TestSlide:
    """Write the tissue image as a 20x pyramidal slide (levels 1, 4, 16)."""
    image, mask = tissue_image(size, seed)
    write_pyramidal_tiff(
        path, image, mpp=mpp, objective_power=None if mpp is None else 10 / mpp, downsamples=(1, 4, 16)
    )
    return TestSlide(path, mask, mpp)


def make_white_slide(path: Path, size: int = 2048) -> Path:
    """A slide of blank glass (noise only): no tissue."""
    rng = np.random.default_rng(1)
    image = np.clip(240 + rng.integers(-4, 5, (size, size, 3)), 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(path, image, mpp=0.5, objective_power=20, downsamples=(1, 4, 16))


CMU = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"  # real 20x Aperio slide, CC0


def write_czi(
    path: Path, image: np.ndarray, mpp: float, *, offset: tuple[int, int] = (0, 0), scenes: int = 1
) -> Path:
    """A CZI written with pylibCZIrw (the Zeiss library): ``image`` cut into ``scenes`` side-by-side scenes
    placed at ``offset`` (x, y) on the slide plane, with ``mpp`` as the scaling. libCZI writes no pyramid."""
    from pylibCZIrw import czi

    width = image.shape[1]
    bounds = np.linspace(0, width, scenes + 1).astype(int)
    with czi.create_czi(str(path), exist_ok=True) as writer:
        for scene, (x0, x1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            bgr = np.ascontiguousarray(image[:, x0:x1, ::-1])  # libCZI stores Bgr24
            writer.write(
                bgr, plane={"C": 0, "Z": 0, "T": 0}, location=(offset[0] + int(x0), offset[1]), scene=scene
            )
        writer.write_metadata(
            document_name="test", channel_names={0: "TL"}, scale_x=mpp * 1e-6, scale_y=mpp * 1e-6
        )
    return path
