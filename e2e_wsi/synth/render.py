"""H&E-like slide painter: tissue pieces, stroma texture, nuclei and label-carrying lesions.

Rendering is layered to stay fast at 8k x 8k: tissue and lesion geometry live on a coarse grid at
level-0 / 16 (which is also the ground-truth mask), stain fields and nuclei are painted at level-0 /
``scale`` (default 4, i.e. 10x, where the models look), and only the final RGB image is upsampled to
level 0 in C (PIL); the cohort writer streams that upsampling tile band by tile band.
Sizes of structures are stated in level-0 pixels at 0.25 um/px (40x).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from e2e_wsi.synth import nuclei as _nuclei
from e2e_wsi.synth.nuclei import ARRANGEMENTS, Nuclei
from e2e_wsi.tasks import synth_cohorts

GRID = 16  # level-0 pixels per ground-truth pixel (the mask is at downsample 16)
# Synthetic cohort kinds, declared by the task specs (e2e_wsi.tasks; each says which task kind it trains).
TASKS: tuple[str, ...] = tuple(synth_cohorts())


def score_driven(task: str) -> bool:
    """Whether cohort ``task`` is score-driven: a case score in [0, 1] sets its lesion burden and
    morphology, and the task spec turns scores into manifest columns (survival, regression)."""
    cohort = synth_cohorts().get(task)
    return cohort is not None and cohort[1].outcomes is not None


_EOSIN = np.array([214.0, 78.0, 150.0], np.float32)  # RGB at full eosin stain
_HEMA = np.array([62.0, 30.0, 118.0], np.float32)  # RGB at full haematoxylin stain
_PENS = np.array([[20, 120, 60], [25, 45, 150], [30, 30, 30]], np.float32)  # green, blue, black


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
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
    wobble = _lowfreq(rng, grid, 14)
    field = np.full(grid, -1.0, np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0.22, 0.78) * gh, rng.uniform(0.22, 0.78) * gw
        ry, rx = rng.uniform(0.16, 0.28, 2) * side
        th = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / rx
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / ry
        field = np.maximum(field, 1.0 - np.sqrt(u * u + v * v) + 0.3 * wobble)
    # keep a margin of glass around the tissue, like a real slide's cover-slip area
    border = np.minimum(np.minimum(yy, gh - 1 - yy), np.minimum(xx, gw - 1 - xx))
    field = np.minimum(field, border / (0.04 * side) - 1.0)
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
    radius = rng.uniform(28.0, 48.0) * 16 / GRID  # in grid px: 450-770 level-0 px
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


def lesion_plan(
    task: str, label: float, num_classes: int, num_grades: int, rng: np.random.Generator
) -> tuple[str, str, float, float]:
    """Morphology of a slide's lesions: (arrangement A, arrangement B, share of B, nucleus size scale).

    subtype: class c uses one arrangement (glands, chains, sheet, lymphoid, then repeating at a larger
    nuclear size). grade g: a mix of low-grade glands and high-grade sheets, more sheet with higher g.
    score-driven cohorts (survival, regression): the same mix driven by the case score ``label`` in
    [0, 1]. diagnosis: a random arrangement.
    """
    if task == "subtype":
        c = int(label)
        return ARRANGEMENTS[c % 4], ARRANGEMENTS[c % 4], 0.0, 1.0 + 0.25 * (c // 4)
    if task == "grade":
        share = (int(label) - 1) / (num_grades - 2) if num_grades > 2 else 1.0
        return "glands", "sheet", float(np.clip(share, 0.0, 1.0)), 1.0
    if score_driven(task):
        return "glands", "sheet", float(np.clip(label, 0.0, 1.0)), 1.0
    name = ARRANGEMENTS[int(rng.integers(len(ARRANGEMENTS)))]
    return name, name, 0.0, 1.0


def lesion_burden(task: str, label: float, lesion_fraction: float, num_grades: int = 6) -> float:
    """Share of tissue that a slide's lesions cover, given the task's label.

    grade: grade 0 has none, then 0.5x to 1.5x ``lesion_fraction`` from grade 1 to K-1. score-driven
    (survival, regression): 0.25x to 1.75x with the case score in [0, 1]. diagnosis: none for label 0.
    subtype: as given.
    """
    if task == "grade":
        g = int(label)
        return 0.0 if g == 0 else min(1.0, lesion_fraction * (0.5 + (g - 1) / max(num_grades - 2, 1)))
    if score_driven(task):
        return min(1.0, lesion_fraction * (0.25 + 1.5 * float(label)))
    if task == "diagnosis" and int(label) == 0:
        return 0.0
    return lesion_fraction


def _lesion_nuclei(
    rng: np.random.Generator, lesion: np.ndarray, plan: tuple[str, str, float, float], scale: int
) -> tuple[Nuclei, np.ndarray]:
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


def _lowfreq(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise with ~``cells`` blobs across, float32 [*shape], unit std; cheap at any size."""
    coarse = (max(2, cells * shape[0] // max(shape)), max(2, cells * shape[1] // max(shape)))
    field = _upsample(ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 1.0), shape)
    return (field - field.mean()) / (field.std() + 1e-8)


def _stroma(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Fibrous eosin density at level-0 / 8, float32 [H/8, W/8]: two fibre orientations blended."""
    shape = (size[0] // 8, size[1] // 8)
    fib_a = _smooth_noise(rng, shape, (0.7, 5.0))
    fib_b = _smooth_noise(rng, shape, (5.0, 0.7))
    blend = 1.0 / (1.0 + np.exp(-3.0 * _lowfreq(rng, shape, 12)))
    tex = 0.52 + 0.16 * (blend * fib_a + (1.0 - blend) * fib_b) + 0.08 * _lowfreq(rng, shape, 24)
    return np.clip(tex, 0.1, 1.0)


def _pen_mask(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """A marker stroke like a pathologist's annotation: uint8 [h, w] opacity (255 = opaque)."""
    height, width = shape
    t = np.linspace(0, 1, 200)
    y = height * (
        rng.uniform(0.15, 0.85) + 0.25 * np.sin(2 * np.pi * (rng.uniform(0.3, 0.8) * t + rng.random()))
    )
    x = width * (0.1 + 0.8 * t)
    if rng.random() < 0.5:
        y, x = x * height / width, y * width / height
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).line(
        list(zip(x.tolist(), y.tolist(), strict=True)),
        fill=190,
        width=max(int(160 / scale), 2),
        joint="curve",
    )
    return np.asarray(canvas)


def _band(field: Image.Image, factor: float, rows: tuple[int, int], width: int) -> np.ndarray:
    """Rows ``rows`` of a float field upsampled by ``factor`` (bilinear, seamless across bands)."""
    r0, r1 = rows
    box = (0.0, r0 / factor, float(field.width), r1 / factor)
    return np.asarray(field.resize((width, r1 - r0), Image.Resampling.BILINEAR, box=box))


def _compose(
    rng: np.random.Generator,
    tfield: np.ndarray,
    ramp: float,
    stroma: np.ndarray,
    hema: np.ndarray,
    lumen: np.ndarray,
    pen: np.ndarray | None,
    scale: int,
) -> np.ndarray:
    """Blend stains into RGB uint8 [h, w, 3] band by band (temporaries stay small and in cache).

    Args:
        tfield: Signed tissue field on the coarse grid [gh, gw].
        ramp: Field change over which the tissue edge fades in.
        stroma: Eosin density at level-0 / 8.
        hema, lumen: Haematoxylin and lumen canvases, uint8 [h, w] at render resolution.
        pen: Marker opacity uint8 [h, w] or ``None``.
        scale: Level-0 px per render px.
    """
    height, width = hema.shape
    eosin_rgb = _EOSIN + rng.normal(0, 8, 3).astype(np.float32)  # stain variation between slides
    hema_rgb = _HEMA + rng.normal(0, 8, 3).astype(np.float32)
    pen_rgb = _PENS[int(rng.integers(len(_PENS)))]
    out = np.empty((height, width, 3), np.uint8)
    step = 256
    inv = np.float32(1 / 255)
    tfield_img, stroma_img = (Image.fromarray(np.ascontiguousarray(f, np.float32)) for f in (tfield, stroma))
    for r0 in range(0, height, step):
        rows = (r0, min(r0 + step, height))
        alpha = np.clip(_band(tfield_img, GRID / scale, rows, width) / ramp + 0.5, 0.0, 1.0)
        e = alpha * _band(stroma_img, 8 / scale, rows, width) * (1.0 - 0.95 * inv * lumen[rows[0] : rows[1]])
        h = alpha * inv * hema[rows[0] : rows[1]] * (1.0 - inv * lumen[rows[0] : rows[1]])
        grain = (rng.random(alpha.shape, dtype=np.float32) - 0.5) * 10.0 * alpha + 255.0
        p = None if pen is None else inv * pen[rows[0] : rows[1]]
        for c in range(3):
            # white light minus eosin absorption, then haematoxylin laid over it
            plane = (
                grain
                - e * (255.0 - eosin_rgb[c])
                - h * (255.0 - hema_rgb[c])
                + (e * h) * (255.0 - eosin_rgb[c])
            )
            if p is not None:
                plane += p * (pen_rgb[c] - plane)
            out[rows[0] : rows[1], :, c] = np.clip(plane, 0, 255)
    return out


def _check_label(task: str, label: float, num_classes: int, num_grades: int) -> None:
    if score_driven(task):
        ok, expected = 0.0 <= label <= 1.0, "a case score (risk) in [0, 1]"
    else:
        k = {"subtype": num_classes, "grade": num_grades, "diagnosis": 2}[task]
        ok, expected = float(label).is_integer() and 0 <= label < k, f"an integer in 0..{k - 1}"
    if not ok:
        raise ValueError(f"label for task {task!r} must be {expected}, got {label!r}")


def paint_slide(
    rng: np.random.Generator,
    size: tuple[int, int],
    task: str,
    label: float,
    lesion_fraction: float,
    *,
    num_classes: int = 2,
    num_grades: int = 6,
    pen_marks: bool = False,
    scale: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`render_slide` but return the image at level-0 / ``scale`` (no upsampling).

    Returns:
        ``(small, truth)``: RGB uint8 [H/scale, W/scale, 3] and the mask uint8 [H/16, W/16].
    """
    height, width = (int(s) for s in size)
    _check_paint_args(height, width, task, label, lesion_fraction, num_classes, num_grades, scale)
    grid = (height // GRID, width // GRID)
    render = (height // scale, width // scale)
    # independent streams per layer: the label changes only the lesion content, not tissue or stain
    geo_rng, lesion_geo_rng, cell_rng, lesion_rng, stain_rng, pen_rng = rng.spawn(6)
    tfield = tissue_field(geo_rng, grid)
    tissue = tfield > 0
    lesion = lesion_grid(lesion_geo_rng, tissue, lesion_burden(task, label, lesion_fraction, num_grades))
    plan = lesion_plan(task, label, num_classes, num_grades, lesion_rng)

    hema = np.zeros(render, np.uint8)
    _nuclei.stamp_ellipses(hema, _nuclei.stroma_nuclei(cell_rng, render, scale), cell_rng)
    lesion_nuc, lumens = _lesion_nuclei(lesion_rng, lesion, plan, scale)
    lumen = np.zeros(render, np.uint8)
    if len(lumens):
        _stamp_glands(hema, lumen, lumens, lesion_rng)
    _nuclei.stamp_ellipses(hema, lesion_nuc, lesion_rng)
    pen = _pen_mask(pen_rng, render, scale) if pen_marks else None
    # soft tissue edge over ~2 render px: the field falls by ~1 per piece radius (~0.18 * grid side)
    ramp = 2.0 * scale / GRID / (0.18 * min(grid))
    stroma = _stroma(stain_rng, (height, width))
    small = _compose(stain_rng, tfield, ramp, stroma, hema, lumen, pen, scale)
    truth = np.where(lesion, 255, np.where(tissue, 128, 0)).astype(np.uint8)
    return small, truth


def _check_paint_args(
    height: int,
    width: int,
    task: str,
    label: float,
    lesion_fraction: float,
    num_classes: int,
    num_grades: int,
    scale: int,
) -> None:
    """Reject a size, task, label, lesion fraction or scale that :func:`paint_slide` cannot paint."""
    if height < 256 or width < 256 or height % GRID or width % GRID:
        raise ValueError(f"slide size must be at least 256 and a multiple of {GRID}, got {height}x{width}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    if scale not in (1, 2, 4):
        raise ValueError(f"scale must be 1, 2 or 4, got {scale}")
    _check_label(task, label, num_classes, num_grades)


def _stamp_glands(hema: np.ndarray, lumen: np.ndarray, lumens: np.ndarray, rng: np.random.Generator) -> None:
    """Draw glands in place: a faint epithelial ring into ``hema`` and the empty lumen disc into ``lumen``.

    Args:
        hema: uint8 [h, w] haematoxylin density at render scale.
        lumen: uint8 [h, w] lumen mask at render scale.
        lumens: float [n, 3] gland centres (y, x) and lumen radius, in render px.
        rng: The lesion stream (drawn from in a fixed order: ring, then disc).
    """
    n = len(lumens)
    # epithelium: a faintly basophilic cytoplasm ring under the nuclei, around an empty lumen
    epi = 2 * lumens[:, 2] * 1.8  # out to the nuclear ring at ~1.1 ring radius
    _nuclei.stamp_ellipses(
        hema,
        Nuclei(lumens[:, 0], lumens[:, 1], epi, epi, np.zeros(n, np.float32), np.full(n, 0.38, np.float32)),
        rng,
        texture=0.15,
    )
    diameter = 2 * lumens[:, 2]
    disc = Nuclei(
        lumens[:, 0], lumens[:, 1], diameter, diameter, np.zeros(n, np.float32), np.ones(n, np.float32)
    )
    _nuclei.stamp_ellipses(lumen, disc, rng, texture=0.05)


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
    scale: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one H&E-like slide and its ground truth.

    Args:
        rng: Generator; the same state gives the same pixels.
        size: Level-0 (H, W), both multiples of 16.
        task: A cohort kind of :data:`TASKS` (``subtype``, ``grade``, ``diagnosis``, or a score-driven
            one such as ``survival``); with ``label`` it decides the
            lesion morphology and burden (see :func:`lesion_plan`, :func:`lesion_burden`).
        label: Class (subtype), grade 0..K-1 (0 = no lesion), case score in [0, 1] (score-driven) or 0/1
            (diagnosis, 0 = no lesion).
        lesion_fraction: Base share of tissue area covered by lesion, in [0, 1].
        num_classes: Number of subtype classes.
        num_grades: Number of grades K.
        pen_marks: Draw a marker stroke across the slide.
        scale: Level-0 pixels per painted pixel (1, 2 or 4); 4 paints at 10x and upsamples.

    Returns:
        ``(image, truth)``: RGB uint8 [H, W, 3] and the mask uint8 [H/16, W/16] with 0 background,
        128 tissue, 255 lesion.

    Raises:
        ValueError: On a size that is not a multiple of 16, an unknown task or a bad fraction/scale.
    """
    small, truth = paint_slide(
        rng,
        size,
        task,
        label,
        lesion_fraction,
        num_classes=num_classes,
        num_grades=num_grades,
        pen_marks=pen_marks,
        scale=scale,
    )
    if scale == 1:
        return small, truth
    image = Image.fromarray(small).resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR)
    return np.asarray(image), truth
