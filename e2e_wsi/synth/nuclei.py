"""Vectorised nucleus stamping and the lesion arrangements that carry a slide's label.

All sizes here are in *render* pixels (the renderer draws at level-0 / ``scale``); the arrangement
functions take level-0 sizes and convert. Nuclei are soft ellipses with a speckled chromatin texture,
stamped as one batch of sprites with fancy indexing instead of a Python loop per nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARRANGEMENTS = ("glands", "chains", "sheet", "lymphoid")


@dataclass
class Nuclei:
    """A batch of nuclei in render pixels: centres (y, x), full axes (long, short), angle, darkness."""

    y: np.ndarray
    x: np.ndarray
    long: np.ndarray
    short: np.ndarray
    theta: np.ndarray
    dark: np.ndarray

    @staticmethod
    def concat(parts: list[Nuclei]) -> Nuclei:
        fields = ("y", "x", "long", "short", "theta", "dark")
        if not parts:
            return Nuclei(*(np.zeros(0, np.float32) for _ in fields))
        return Nuclei(*(np.concatenate([getattr(p, f) for p in parts]).astype(np.float32) for f in fields))

    def select(self, keep: np.ndarray) -> Nuclei:
        return Nuclei(
            self.y[keep], self.x[keep], self.long[keep], self.short[keep], self.theta[keep], self.dark[keep]
        )


def stamp_ellipses(
    canvas: np.ndarray, nuc: Nuclei, rng: np.random.Generator, texture: float = 0.3, chunk: int = 4096
) -> None:
    """Draw soft ellipses into ``canvas`` (uint8 [h, w], 255 = full stain) keeping the maximum.

    Args:
        canvas: Stain canvas, modified in place.
        nuc: Nuclei in canvas pixel coordinates.
        rng: Generator for the chromatin speckle.
        texture: Speckle strength in [0, 1] (0 = flat ellipses).
        chunk: Nuclei per vectorised batch (bounds the temporary [chunk, S, S] arrays).
    """
    if len(nuc.y) == 0:
        return
    half = int(np.ceil(float(nuc.long.max()) / 2)) + 2
    offs = np.arange(-half, half + 1, dtype=np.float32)
    height, width = canvas.shape
    for start in range(0, len(nuc.y), chunk):
        part = nuc.select(slice(start, start + chunk))
        cy, cx = np.round(part.y).astype(np.int64), np.round(part.x).astype(np.int64)
        # sub-pixel offset so the ellipse centre is exact, not snapped to the grid
        dy = offs[None, :, None] - (part.y - cy)[:, None, None]
        dx = offs[None, None, :] - (part.x - cx)[:, None, None]
        cos, sin = np.cos(part.theta)[:, None, None], np.sin(part.theta)[:, None, None]
        u = (dx * cos + dy * sin) / (part.long[:, None, None] / 2)
        v = (-dx * sin + dy * cos) / (part.short[:, None, None] / 2)
        # ramp of ~1.5 px at the rim: the edge survives downsampling without aliasing
        rim = np.minimum(part.short, part.long)[:, None, None] / 3.0
        val = np.clip((1.0 - (u * u + v * v)) * rim, 0.0, 1.0)
        speckle = 1.0 - texture * rng.random(val.shape, dtype=np.float32)
        val = (val * speckle * part.dark[:, None, None] * 255.0).astype(np.uint8)
        ys = cy[:, None, None] + offs.astype(np.int64)[None, :, None]
        xs = cx[:, None, None] + offs.astype(np.int64)[None, None, :]
        ys, xs = np.broadcast_arrays(ys, xs)
        inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width) & (val > 0)
        ys, xs, val = ys[inside], xs[inside], val[inside]
        # overlapping sprites: keep the darker value (duplicates inside one batch: last one wins)
        canvas[ys, xs] = np.maximum(canvas[ys, xs], val)


def _jittered_grid(
    rng: np.random.Generator, box: tuple[int, int, int, int], spacing: float, jitter: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Points on a square grid of ``spacing`` over ``box`` (y0, x0, y1, x1), each moved at random."""
    y0, x0, y1, x1 = box
    gy = np.arange(y0 + spacing / 2, y1, spacing, dtype=np.float32)
    gx = np.arange(x0 + spacing / 2, x1, spacing, dtype=np.float32)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    yy = yy.ravel() + rng.uniform(-jitter, jitter, yy.size).astype(np.float32) * spacing
    xx = xx.ravel() + rng.uniform(-jitter, jitter, xx.size).astype(np.float32) * spacing
    return yy, xx


def _make(
    y: np.ndarray,
    x: np.ndarray,
    long: np.ndarray | float,
    short: np.ndarray | float,
    theta: np.ndarray | float,
    dark: np.ndarray | float,
) -> Nuclei:
    n = len(y)
    full = [np.broadcast_to(np.asarray(v, np.float32), (n,)).copy() for v in (long, short, theta, dark)]
    return Nuclei(np.asarray(y, np.float32), np.asarray(x, np.float32), *full)


def glands(
    rng: np.random.Generator, box: tuple[int, int, int, int], scale: float, size: float = 1.0
) -> tuple[Nuclei, np.ndarray]:
    """Gland-like rings of large, round, dark nuclei around a pale lumen.

    Returns:
        The nuclei and the lumens as float32 [n, 3] rows (y, x, radius) in render pixels.
    """
    radius = 110.0 * size / scale  # ring radius, level-0 px -> render px
    cy, cx = _jittered_grid(rng, box, spacing=2.4 * radius, jitter=0.1)
    radii = radius * rng.uniform(0.8, 1.1, cy.size).astype(np.float32)
    per_ring = np.maximum(8, np.round(2 * np.pi * radii / (40.0 * size / scale))).astype(np.int64)
    ring = np.repeat(np.arange(cy.size), per_ring)
    k = np.concatenate([np.arange(n) for n in per_ring]) if per_ring.size else np.zeros(0, np.int64)
    phase = rng.uniform(0, 2 * np.pi, cy.size)[ring]
    ang = (2 * np.pi * k / per_ring[ring] + phase).astype(np.float32)
    r = radii[ring] * rng.uniform(0.95, 1.05, ang.size).astype(np.float32)
    y, x = cy[ring] + r * np.sin(ang), cx[ring] + r * np.cos(ang)
    n = y.size
    long = rng.uniform(36, 46, n) * size / scale
    nuc = _make(y, x, long, long * rng.uniform(0.8, 0.95, n), ang + np.pi / 2, rng.uniform(0.85, 1.0, n))
    lumens = np.stack([cy, cx, radii * 0.62], axis=1).astype(np.float32)
    return nuc, lumens


def chains(
    rng: np.random.Generator, box: tuple[int, int, int, int], scale: float, size: float = 1.0
) -> Nuclei:
    """Single-file chains of smaller elongated nuclei, roughly parallel within a region."""
    spacing = 90.0 * size / scale
    sy, sx = _jittered_grid(rng, box, spacing=spacing, jitter=0.5)
    main = rng.uniform(0, np.pi)
    steps = 10
    # each chain is a short random walk whose heading drifts slowly around the region's main axis
    heading = main + rng.normal(0, 0.3, (sy.size, 1)) + np.cumsum(rng.normal(0, 0.12, (sy.size, steps)), 1)
    step = 32.0 * size / scale
    y = sy[:, None] + np.cumsum(step * np.sin(heading), 1) - step * steps / 2 * np.sin(main)
    x = sx[:, None] + np.cumsum(step * np.cos(heading), 1) - step * steps / 2 * np.cos(main)
    n = y.size
    long = rng.uniform(30, 38, n) * size / scale
    return _make(
        y.ravel(),
        x.ravel(),
        long,
        long * rng.uniform(0.35, 0.45, n),
        heading.ravel(),
        rng.uniform(0.8, 0.95, n),
    )


def sheet(
    rng: np.random.Generator, box: tuple[int, int, int, int], scale: float, size: float = 1.0
) -> Nuclei:
    """Solid sheet of crowded, pleomorphic nuclei (variable size, shape, darkness)."""
    y, x = _jittered_grid(rng, box, spacing=50.0 * size / scale, jitter=0.3)
    n = y.size
    long = rng.uniform(34, 54, n) * size / scale
    return _make(
        y, x, long, long / rng.uniform(1.0, 1.6, n), rng.uniform(0, np.pi, n), rng.uniform(0.55, 1.0, n)
    )


def lymphoid(
    rng: np.random.Generator, box: tuple[int, int, int, int], scale: float, size: float = 1.0
) -> Nuclei:
    """Densely packed small round very dark nuclei."""
    y, x = _jittered_grid(rng, box, spacing=28.0 * size / scale, jitter=0.3)
    n = y.size
    long = rng.uniform(20, 25, n) * size / scale
    return _make(
        y, x, long, long * rng.uniform(0.85, 1.0, n), rng.uniform(0, np.pi, n), rng.uniform(0.9, 1.0, n)
    )


def arrangement(
    name: str, rng: np.random.Generator, box: tuple[int, int, int, int], scale: float, size: float = 1.0
) -> tuple[Nuclei, np.ndarray]:
    """Nuclei (and lumens, empty unless glands) of one named arrangement over a render-pixel box."""
    if name == "glands":
        return glands(rng, box, scale, size)
    fn = {"chains": chains, "sheet": sheet, "lymphoid": lymphoid}[name]
    return fn(rng, box, scale, size), np.zeros((0, 3), np.float32)


def stroma_nuclei(
    rng: np.random.Generator, shape: tuple[int, int], scale: float, density: float = 1.0
) -> Nuclei:
    """Sparse background cells everywhere: spindle fibroblasts and a few round lymphocytes."""
    height, width = shape
    n = int(height * width * scale * scale / (130.0**2) * density)
    y = rng.uniform(0, height, n)
    x = rng.uniform(0, width, n)
    lymph = rng.random(n) < 0.2
    long = np.where(lymph, rng.uniform(20, 24, n), rng.uniform(28, 40, n)) / scale
    short = np.where(lymph, long * 0.9, long * rng.uniform(0.25, 0.4, n))
    return _make(y, x, long, short, rng.uniform(0, np.pi, n), rng.uniform(0.55, 0.85, n))
