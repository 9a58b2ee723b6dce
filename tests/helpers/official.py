"""The official E2E-WSI-ABMILX modules written out as plain tensor equations, and a textured 256 px patch
cache, for parity tests.

Weights use the OFFICIAL parameter names and shapes (``modules/abmilx.py`` class ``DAttentionX``,
``modules/vit_mil.py`` class ``Mlp``, with the paper settings ``mil_norm=ln``, ``no_mil_bias``) under
the E2E wrapper prefix ``mil.``. Nothing here imports the modules under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import imagecodecs
import numpy as np
import torch
import torch.nn.functional as F

from e2e_wsi.cache.store import CacheWriter, mag_key

D, INNER, CLASSES = 12, 16, 3
PATCH = 256
MAIN, SUB = 10.0, 5.0
SLIDES = 10


def ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, eps 1e-5."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * weight
    return y if bias is None else y + bias


def official_abmilx_state(
    heads: int,
    attn_bias: bool,
    ffn: bool,
    seed: int = 0,
    dim: int = D,
    inner: int = INNER,
    classes: int = CLASSES,
    scale: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Random weights under the official DAttentionX names (E2E wrapper prefix ``mil.``)."""
    g = torch.Generator().manual_seed(seed)
    hd = inner // heads

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    s = {
        "mil.feature.0.weight": 1 + r(dim) * 0.2,  # LayerNorm(input_dim, bias=False)
        "mil.feature.1.weight": r(inner, dim),
        "mil.attention.fc1.weight": r(hd, hd),
        "mil.attention.fc2.weight": r(1, hd),
        "mil.attn_plus_fn.qk.weight": r(2 * hd, hd),
        "mil.attn_plus_fn.v.weight": torch.tensor([[-0.7]]),  # alpha, negative on purpose
        "mil.attn_plus_fn.norm_x.weight": 1 + r(hd) * 0.2,
        "mil.attn_plus_fn.norm_x.bias": r(hd) * 0.2,
        "mil.proj.weight": r(inner, inner),
        "mil.norm1.weight": 1 + r(inner) * 0.2,
        "mil.classifier.weight": r(classes, inner),
    }
    if attn_bias:
        s["mil.attention.fc1.bias"] = r(hd)
        s["mil.attention.fc2.bias"] = r(1)
    if ffn:
        s.update(
            {
                "mil.mlp.fc1.weight": r(4 * inner, inner),
                "mil.mlp.fc1.bias": r(4 * inner),
                "mil.mlp.fc2.weight": r(inner, 4 * inner),
                "mil.mlp.fc2.bias": r(inner),
            }
        )
    return s


def official_abmilx_forward(s: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The official DAttentionX forward in eval mode, written out: x [B, N, dim] -> logits [B, classes]."""
    b, n, _ = x.shape
    inner = s["mil.feature.1.weight"].shape[0]
    hd = inner // heads
    h = F.gelu(ln(x, s["mil.feature.0.weight"]) @ s["mil.feature.1.weight"].T)
    h = h.reshape(b, n, heads, hd).transpose(1, 2)  # [B, H, N, hd]
    a = F.gelu(h @ s["mil.attention.fc1.weight"].T + s.get("mil.attention.fc1.bias", 0))
    a = a @ s["mil.attention.fc2.weight"].T + s.get("mil.attention.fc2.bias", 0)  # [B, H, N, 1]
    qk = ln(h, s["mil.attn_plus_fn.norm_x.weight"], s["mil.attn_plus_fn.norm_x.bias"])
    qk = qk @ s["mil.attn_plus_fn.qk.weight"].T
    q, k = qk[..., :hd], qk[..., hd:]
    u = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # [B, H, N, N]
    a = a + u @ (a * s["mil.attn_plus_fn.v.weight"][0, 0])
    w = torch.softmax(a.transpose(-1, -2), dim=-1)  # [B, H, 1, N]
    z = (w @ h).reshape(b, inner) @ s["mil.proj.weight"].T
    if "mil.mlp.fc1.weight" in s:
        hidden = F.gelu(z @ s["mil.mlp.fc1.weight"].T + s["mil.mlp.fc1.bias"])
        z = z + hidden @ s["mil.mlp.fc2.weight"].T + s["mil.mlp.fc2.bias"]
    z = ln(z, s["mil.norm1.weight"])
    return z @ s["mil.classifier.weight"].T


def textured_tile(rng: np.random.Generator) -> np.ndarray:
    """A 256 px RGB tile with coarse colour structure and fine detail (so crops and channels matter)."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (3, 6, 6)).astype(np.float32))[None]
    img = torch.nn.functional.interpolate(coarse, size=(PATCH, PATCH), mode="bilinear", align_corners=False)[
        0
    ]
    img[:, :16] = torch.from_numpy(rng.uniform(0, 255, (3, 1, 1)).astype(np.float32))  # a border band
    img += torch.from_numpy(rng.normal(0, 12, (3, PATCH, PATCH)).astype(np.float32))
    return np.ascontiguousarray(img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def write_textured_cache(path: Path, slides: int = SLIDES) -> list[str]:
    """A real LMDB patch cache of ``slides`` slides with 256 px textured patches at 10x (5-7) and 5x (2)."""
    path.mkdir(parents=True)
    writer = CacheWriter(path / "patches.lmdb", map_size=1 << 27)
    ids = [f"slide{i:02d}" for i in range(slides)]
    for s, slide_id in enumerate(ids):
        counts = {MAIN: 5 + s % 3, SUB: 2}
        meta = {
            "format_version": 1, "slide_id": slide_id, "source_path": f"{slide_id}.svs", "mpp": 1.0,
            "objective_power": 10, "dimensions": [4096, 4096], "patch_size": PATCH, "tissue_fraction": 0.5,
            "params": {}, "magnifications": {},
        }  # fmt: skip
        for m, n in counts.items():
            step = int(PATCH * 10 / m)
            coords = [[i * step, 0] for i in range(n)]
            meta["magnifications"][mag_key(m)] = {"count": n, "size_level0": step, "coords": coords}

        def patches(s: int = s, counts: dict[float, int] = counts):
            rng = np.random.default_rng(100 + s)
            for m, n in counts.items():
                for i in range(n):
                    yield m, i, bytes(imagecodecs.jpeg8_encode(textured_tile(rng), level=90))

        writer.commit_slide(meta, patches)
    writer.close()
    return ids
