"""H&E-like slide painter: tissue pieces, stroma texture, nuclei and label-carrying lesions.

Rendering is layered to stay fast at 8k x 8k: tissue and lesion geometry live on a coarse grid at
level-0 / 16 (which is also the ground-truth mask), stain fields and nuclei are drawn at level-0 /
``scale`` (default 2, i.e. 20x), and only the final RGB image is upsampled to level 0 in C (PIL).
Sizes of structures are stated in level-0 pixels at 0.25 um/px (40x).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from e2e_wsi.slides import _nuclei
from e2e_wsi.slides._nuclei import ARRANGEMENTS, Nuclei

GRID = 16  # level-0 pixels per ground-truth pixel (the mask is at downsample 16)
TASKS = ("subtype", "grade", "survival", "diagnosis")
_EOSIN = np.array([214.0, 78.0, 150.0], np.float32)  # RGB at full eosin stain
_HEMA = np.array([62.0, 30.0, 118.0], np.float32)  # RGB at full haematoxylin stain
_PENS = np.array([[20, 120, 60], [25, 45, 150], [30, 30, 30]], np.float32)  # green, blue, black


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit std, float32 [*shape]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a float32 field to ``shape`` (h, w), done in C by PIL."""
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def tissue_field(rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    """Signed tissue field on the coarse grid: > 0 inside tissue, float32 [gh, gw].

    A few irregular pieces (noisy rotated ellipses) with sparse holes (vessels, fat, tears).
    """
    gh, gw = grid
    side = float(min(gh, gw))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    wobble = _smooth_noise(rng, grid, side / 20)
    field = np.full(grid, -1.0, np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.25, 0.75) * gh, rng.uniform(0.25, 0.75) * gw
        ry, rx = rng.uniform(0.12, 0.24, 2) * side
        th = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / rx
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / ry
        field = np.maximum(field, 1.0 - np.sqrt(u * u + v * v) + 0.3 * wobble)
    holes = _smooth_noise(rng, grid, side / 80)
    field -= np.clip(holes - 2.0, 0.0, None) * 3.0  # only the top ~2% of the noise punches holes
    return field


def lesion_grid(rng: np.random.Generator, tissue: np.ndarray, fraction: float) -> np.ndarray:
    """Lesion mask on the coarse grid covering ``fraction`` of the tissue, bool [gh, gw].

    Lesions are a few irregular blobs ~0.9-1.5k level-0 px across (about one or two 10x patches),
    placed inside tissue; the blob field is thresholded at the quantile that gives the fraction.
    """
    area = int(tissue.sum())
    if fraction <= 0 or area == 0:
        return np.zeros_like(tissue)
    if fraction >= 1:
        return tissue.copy()
    radius = rng.uniform(28.0, 48.0) * 16 / GRID  # grid px
    count = int(np.clip(round(fraction * area / (np.pi * radius**2)), 1, 40))
    depth = ndimage.distance_transform_edt(tissue)
    inner = np.flatnonzero(depth.ravel() >= min(radius * 0.7, depth.max() * 0.6))
    centres = rng.choice(inner, size=count, replace=count > inner.size)
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    field = np.full(tissue.shape, -np.inf, np.float32)
    for c in centres:
        cy, cx = divmod(int(c), tissue.shape[1])
        r = radius * rng.uniform(0.7, 1.3)
        field = np.maximum(field, 1.0 - np.hypot(yy - cy, xx - cx) / r)
    field += 0.3 * _smooth_noise(rng, tissue.shape, radius / 4)
    thresh = np.quantile(field[tissue], 1.0 - fraction)
    return (field > thresh) & tissue


def lesion_plan(task: str, label: float, num_classes: int, num_grades: int,
                rng: np.random.Generator) -> tuple[str, str, float, float]:
    """Morphology of a slide's lesions: (arrangement A, arrangement B, share of B, nucleus size scale).

    subtype: class c uses one arrangement (glands, chains, sheet, lymphoid, then repeating at a larger
    nuclear size). grade g: a mix of low-grade glands and high-grade sheets, more sheet with higher g.
    survival: the same mix driven by the risk ``label`` in [0, 1]. diagnosis: a random arrangement.
    """
    if task == "subtype":
        c = int(label)
        return ARRANGEMENTS[c % 4], ARRANGEMENTS[c % 4], 0.0, 1.0 + 0.25 * (c // 4)
    if task == "grade":
        share = (int(label) - 1) / (num_grades - 2) if num_grades > 2 else 1.0
        return "glands", "sheet", float(np.clip(share, 0.0, 1.0)), 1.0
    if task == "survival":
        return "glands", "sheet", float(np.clip(label, 0.0, 1.0)), 1.0
    name = ARRANGEMENTS[int(rng.integers(len(ARRANGEMENTS)))]
    return name, name, 0.0, 1.0


def lesion_burden(task: str, label: float, lesion_fraction: float, num_grades: int = 6) -> float:
    """Share of tissue that a slide's lesions cover, given the task's label.

    grade: grade 0 has none, then 0.5x to 1.5x ``lesion_fraction`` from grade 1 to K-1. survival:
    0.25x to 1.75x with the risk in [0, 1]. diagnosis: none for label 0. subtype: as given.
    """
    if task == "grade":
        g = int(label)
        return 0.0 if g == 0 else min(1.0, lesion_fraction * (0.5 + (g - 1) / max(num_grades - 2, 1)))
    if task == "survival":
        return min(1.0, lesion_fraction * (0.25 + 1.5 * float(label)))
    if task == "diagnosis" and int(label) == 0:
        return 0.0
    return lesion_fraction


def _lesion_nuclei(rng: np.random.Generator, lesion: np.ndarray, plan: tuple[str, str, float, float],
                   scale: int) -> tuple[Nuclei, np.ndarray]:
    """Nuclei and lumens (render px) of the lesion, kept only where the grid says lesion."""
    ys, xs = np.nonzero(lesion)
    if ys.size == 0:
        return Nuclei.concat([]), np.zeros((0, 3), np.float32)
    f = GRID // scale  # render px per grid px
    box = (int(ys.min()) * f, int(xs.min()) * f, (int(ys.max()) + 1) * f, (int(xs.max()) + 1) * f)
    name_a, name_b, share_b, size = plan
    # which arrangement applies where: a smooth field ranked to [0, 1] over the lesion
    mix = _smooth_noise(rng, lesion.shape, 12.0)
    rank = np.zeros(lesion.shape, np.float32)
    rank[lesion] = (np.argsort(np.argsort(mix[lesion])) + 0.5) / ys.size
    nuclei, lumens = [], []
    for name, use_b in ((name_a, False), (name_b, True)):
        if (share_b <= 0 and use_b) or (share_b >= 1 and not use_b) or (name_a == name_b and use_b):
            continue
        nuc, lum = _nuclei.arrangement(name, rng, box, scale, size)
        keep_region = lesion if name_a == name_b else (rank < share_b if use_b else rank >= share_b) & lesion

        def inside(y: np.ndarray, x: np.ndarray, region: np.ndarray = keep_region) -> np.ndarray:
            gy = np.clip((y / f).astype(np.int64), 0, lesion.shape[0] - 1)
            gx = np.clip((x / f).astype(np.int64), 0, lesion.shape[1] - 1)
            return region[gy, gx]

        nuclei.append(nuc.select(inside(nuc.y, nuc.x)))
        if len(lum):
            lumens.append(lum[inside(lum[:, 0], lum[:, 1])])
    lumens_all = np.concatenate(lumens) if lumens else np.zeros((0, 3), np.float32)
    return Nuclei.concat(nuclei), lumens_all


def _stroma(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fibrous eosin texture in [0, 1], float32 [h, w]: two fibre orientations blended smoothly."""
    small = (max(shape[0] // 4, 8), max(shape[1] // 4, 8))
    fib_a = _smooth_noise(rng, small, (0.7, 5.0))
    fib_b = _smooth_noise(rng, small, (5.0, 0.7))
    blend = 1.0 / (1.0 + np.exp(-3.0 * _smooth_noise(rng, small, min(small) / 16)))
    low = _smooth_noise(rng, small, min(small) / 30)
    tex = 0.52 + 0.16 * (blend * fib_a + (1.0 - blend) * fib_b) + 0.08 * low
    return np.clip(_upsample(tex, shape), 0.1, 1.0)


def _pen_mask(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """A marker stroke like a pathologist's annotation: float32 [h, w] opacity in [0, 1]."""
    height, width = shape
    t = np.linspace(0, 1, 200)
    y = height * (rng.uniform(0.15, 0.85) + 0.25 * np.sin(2 * np.pi * (rng.uniform(0.3, 0.8) * t + rng.random())))
    x = width * (0.1 + 0.8 * t)
    if rng.random() < 0.5:
        y, x = x * height / width, y * width / height
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).line(list(zip(x.tolist(), y.tolist(), strict=True)), fill=255,
                                width=max(int(160 / scale), 2), joint="curve")
    return np.asarray(canvas, np.float32) * (0.75 / 255.0)


def _compose(rng: np.random.Generator, alpha: np.ndarray, eosin: np.ndarray, hema: np.ndarray,
             lumen: np.ndarray, pen: np.ndarray | None) -> np.ndarray:
    """Blend stains into RGB uint8 [h, w, 3] (per channel, to keep temporaries to one plane)."""
    eosin_rgb = _EOSIN + rng.normal(0, 8, 3).astype(np.float32)  # stain variation between slides
    hema_rgb = _HEMA + rng.normal(0, 8, 3).astype(np.float32)
    e = alpha * eosin * (1.0 - 0.85 * lumen)
    h = alpha * hema
    grain = rng.standard_normal(alpha.shape, dtype=np.float32) * 3.0
    out = np.empty((*alpha.shape, 3), np.uint8)
    pen_rgb = _PENS[int(rng.integers(len(_PENS)))]
    for c in range(3):
        plane = 255.0 - e * (255.0 - eosin_rgb[c])
        plane = plane * (1.0 - h) + hema_rgb[c] * h + grain * alpha
        if pen is not None:
            plane = plane * (1.0 - pen) + pen_rgb[c] * pen
        out[..., c] = np.clip(plane, 0, 255)
    return out


def render_slide(
    rng: np.random.Generator,
    size: tuple[int, int] = (8192, 8192),
    task: str = "subtype",
    label: float = 0,
    lesion_fraction: float = 0.03,
    *,
    num_classes: int = 2,
    num_grades: int = 6,
    pen_marks: bool = False,
    scale: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one H&E-like slide and its ground truth.

    Args:
        rng: Generator; the same state gives the same pixels.
        size: Level-0 (H, W), both multiples of 16.
        task: ``subtype``, ``grade``, ``survival`` or ``diagnosis``; with ``label`` it decides the
            lesion morphology and burden (see :func:`lesion_plan`, :func:`lesion_burden`).
        label: Class (subtype), grade 0..K-1 (0 = no lesion), risk in [0, 1] (survival) or 0/1
            (diagnosis, 0 = no lesion).
        lesion_fraction: Base share of tissue area covered by lesion, in [0, 1].
        num_classes: Number of subtype classes.
        num_grades: Number of grades K.
        pen_marks: Draw a marker stroke across the slide.
        scale: Level-0 pixels per render pixel (1, 2, 4, 8 or 16); 2 draws at 20x.

    Returns:
        ``(image, truth)``: RGB uint8 [H, W, 3] and the mask uint8 [H/16, W/16] with 0 background,
        128 tissue, 255 lesion.

    Raises:
        ValueError: On a size that is not a multiple of 16, an unknown task or a bad fraction/scale.
    """
    height, width = (int(s) for s in size)
    if height < 256 or width < 256 or height % GRID or width % GRID:
        raise ValueError(f"slide size must be at least 256 and a multiple of {GRID}, got {height}x{width}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    if scale not in (1, 2, 4, 8, 16):
        raise ValueError(f"scale must be one of 1, 2, 4, 8, 16, got {scale}")
    grid = (height // GRID, width // GRID)
    render = (height // scale, width // scale)
    tfield = tissue_field(rng, grid)
    tissue = tfield > 0
    lesion = lesion_grid(rng, tissue, lesion_burden(task, label, lesion_fraction, num_grades))
    plan = lesion_plan(task, label, num_classes, num_grades, rng)

    # soft tissue edge over ~2 render px: the field falls by ~1 per piece radius (~0.18 * grid side)
    ramp = 2.0 * scale / GRID / (0.18 * min(grid))
    alpha = np.clip(_upsample(tfield, render) / ramp + 0.5, 0.0, 1.0)
    hema = np.zeros(render, np.uint8)
    _nuclei.stamp_ellipses(hema, _nuclei.stroma_nuclei(rng, render, scale), rng)
    lesion_nuc, lumens = _lesion_nuclei(rng, lesion, plan, scale)
    _nuclei.stamp_ellipses(hema, lesion_nuc, rng)
    lumen = np.zeros(render, np.uint8)
    if len(lumens):
        disc = Nuclei(lumens[:, 0], lumens[:, 1], 2 * lumens[:, 2], 2 * lumens[:, 2],
                      np.zeros(len(lumens), np.float32), np.full(len(lumens), 0.95, np.float32))
        _nuclei.stamp_ellipses(lumen, disc, rng, texture=0.2)
    pen = _pen_mask(rng, render, scale) if pen_marks else None
    small = _compose(rng, alpha, _stroma(rng, render), hema * np.float32(1 / 255),
                     lumen * np.float32(1 / 255), pen)
    image = small if scale == 1 else np.asarray(
        Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    truth = np.where(lesion, 255, np.where(tissue, 128, 0)).astype(np.uint8)
    return image, truth
