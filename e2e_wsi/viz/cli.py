"""``e2e-wsi heatmap``: run a trained model on every patch of a slide and draw its attention."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from jsonargparse import ArgumentParser

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.data.datasets import Bag, EvalBagDataset
from e2e_wsi.data.transforms import EvalTransform
from e2e_wsi.models.module import SlideModule
from e2e_wsi.training.checkpoints import load_checkpoint
from e2e_wsi.training.run import RunFolder
from e2e_wsi.utils import validate_slide_id
from e2e_wsi.viz.heatmap import SlideAttention, localization_summary, patch_lesion_labels, render_heatmap


def run_dir_of_checkpoint(ckpt_path: str | Path) -> Path:
    """``RUN/checkpoints/x.ckpt`` -> ``RUN``; a checkpoint elsewhere -> its own folder."""
    return RunFolder.of_checkpoint(ckpt_path).root


def load_run(ckpt_path: str | Path, config_path: str | Path | None = None) -> tuple[SlideModule, dict]:
    """Rebuild the model of a run from its saved config and load the checkpoint's weights.

    Args:
        ckpt_path: A checkpoint written by ``e2e-wsi fit``.
        config_path: The run's ``config.yaml``; default: the one in the checkpoint's run folder.

    Returns:
        (model in eval mode, the config's ``data`` section as a dict).

    Raises:
        FileNotFoundError: If the checkpoint or config is missing (the message says what to pass).
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    config_path = Path(config_path) if config_path else run_dir_of_checkpoint(ckpt_path) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"run config {config_path} not found: pass --config RUN/config.yaml")
    config = yaml.safe_load(config_path.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SlideModule, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": config.get("model") or {}})
    model = parser.instantiate_classes(cfg).model
    state = load_checkpoint(ckpt_path)["state_dict"]  # weights_only=True; a clear error if refused
    model.load_state_dict(state)
    model.eval()
    return model, config.get("data") or {}


def slide_attention(
    model: SlideModule,
    cache: PatchCache,
    slide_id: str,
    magnifications: list[float],
    patch_size: int,
) -> tuple[SlideAttention, dict[str, torch.Tensor]]:
    """Attention of the model over every cached patch of a slide at the given magnification(s).

    Patches are encoded ``model.eval_chunk_size`` at a time without gradients, so 10k+ patch slides
    fit in memory (only uint8 patches and the [N, D] features are held whole).

    Returns:
        (the slide's attention, the model's outputs: ``outputs`` [1, K], ``attention`` [1, H, N]).
    """
    validate_slide_id(slide_id)
    if slide_id not in cache:
        raise ValueError(f"slide {slide_id!r} is not in the cache; `e2e-wsi cache info` lists the slides")
    item = EvalBagDataset(cache, [Bag(slide_id, (slide_id,), {})], magnifications, EvalTransform(patch_size))[
        0
    ]
    with model.evaluating():
        out = model(item["images"][None], item["mask"][None])
    meta = cache.meta(slide_id)
    main = meta["magnifications"][mag_key(magnifications[0])]
    att = SlideAttention(
        slide_id=slide_id,
        attention=out["attention"][0].float().numpy(),
        coords=item["coords"].numpy(),
        size_level0=int(main["size_level0"]),
        dimensions=(int(meta["dimensions"][0]), int(meta["dimensions"][1])),
    )
    return att, out


def thumbnail_of(meta: dict, max_side: int = 1400) -> np.ndarray:
    """RGB thumbnail of the source slide, or a white canvas when the slide file is not reachable."""
    w, h = meta["dimensions"]
    scale = max_side / max(w, h)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    source = Path(meta.get("source_path", ""))
    if source.is_file():
        import openslide

        with openslide.OpenSlide(str(source)) as slide:
            thumb = slide.get_thumbnail(size).convert("RGB")
        return np.asarray(thumb.resize(size))
    return np.full((size[1], size[0], 3), 255, dtype=np.uint8)


def find_truth_mask(meta: dict, explicit: str | None) -> np.ndarray | None:
    """The ground-truth mask: ``--mask``, else ``masks/<slide_id>.png`` beside a synthetic cohort's slides."""
    from PIL import Image

    if explicit:
        return np.asarray(Image.open(explicit).convert("L"))
    source = Path(meta.get("source_path", ""))
    candidate = source.parent.parent / "masks" / f"{validate_slide_id(meta['slide_id'])}.png"
    return np.asarray(Image.open(candidate).convert("L")) if candidate.is_file() else None


def make_heatmap(
    model: SlideModule,
    cache: PatchCache,
    slide_id: str,
    out_dir: Path,
    *,
    magnifications: list[float],
    patch_size: int,
    top_k: int = 16,
    method: str = "rank",
    per_head: bool = False,
    mask_path: str | None = None,
) -> dict:
    """Heatmap PNG (+ ``<slide>.localization.json`` when a truth mask exists) for one slide.

    Returns:
        A summary dict: ``png``, ``localization`` (or ``None``), ``prediction``.
    """
    att, out = slide_attention(model, cache, slide_id, magnifications, patch_size)
    meta = cache.meta(slide_id)
    order = np.argsort(-att.merged)[:top_k]
    top = (
        cache.get_many(slide_id, magnifications[0], order.tolist()) if len(order) else np.zeros((0, 1, 1, 3))
    )
    pred = model.task.predict(out["outputs"])
    pred_text = ", ".join(f"{k}={np.round(v[0].numpy(), 3).tolist()}" for k, v in pred.items())
    truth = find_truth_mask(meta, mask_path)
    loc = None
    caption = f"prediction: {pred_text}"
    if truth is not None:
        labels = patch_lesion_labels(att.coords, att.size_level0, truth, att.dimensions)
        loc = localization_summary(att, labels)
        auc = "n/a (one kind of patch only)" if loc["auroc"] is None else f"{loc['auroc']:.3f}"
        caption += (
            f" | lesion localisation AUROC of attention: {auc} "
            f"({loc['n_lesion_patches']}/{loc['n_patches']} lesion patches; "
            f"{100 * loc['attention_on_lesion']:.1f}% of attention on lesion)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_heatmap(
        att,
        thumbnail_of(meta),
        top,
        out_dir / f"{slide_id}.png",
        method=method,
        per_head=per_head,
        caption=caption,
    )
    if loc is not None:
        (out_dir / f"{slide_id}.localization.json").write_text(json.dumps(loc, indent=2) + "\n")
    return {"png": str(png), "localization": loc, "prediction": pred_text}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="e2e-wsi heatmap", description=__doc__)
    p.add_argument("--ckpt_path", required=True, help="checkpoint of a run (RUN/checkpoints/*.ckpt)")
    p.add_argument("--slide", nargs="+", required=True, help="slide id(s) in the cache")
    p.add_argument("--config", default=None, help="run config (default: RUN/config.yaml)")
    p.add_argument("--cache_dir", nargs="+", default=None, help="patch cache (default: the run config's)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/heatmaps)")
    p.add_argument("--top_k", type=int, default=16, help="patches in the top-attention mosaic")
    p.add_argument("--normalize", choices=["rank", "percentile"], default="rank", help="colour scaling")
    p.add_argument("--per_head", action="store_true", help="also draw one map per attention head")
    p.add_argument(
        "--all_scales", action="store_true", help="use every training magnification, not only the main one"
    )
    p.add_argument(
        "--mask", default=None, help="ground-truth lesion mask PNG (255 = lesion) for localisation"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi heatmap``."""
    args = _parser().parse_args(argv)
    model, data_cfg = load_run(args.ckpt_path, args.config)
    cache = PatchCache(args.cache_dir or data_cfg["cache_dir"])
    mags = [float(m) for m in data_cfg.get("magnifications", [10.0])]
    mags = mags if args.all_scales else (data_cfg.get("eval_magnifications") or mags[:1])
    out_dir = Path(args.out) if args.out else run_dir_of_checkpoint(args.ckpt_path) / "heatmaps"
    for slide_id in args.slide:
        summary = make_heatmap(
            model,
            cache,
            slide_id,
            out_dir,
            magnifications=[float(m) for m in mags],
            patch_size=int(data_cfg.get("eval_patch_size", 224)),
            top_k=args.top_k,
            method=args.normalize,
            per_head=args.per_head,
            mask_path=args.mask,
        )
        print(f"e2e-wsi: heatmap {summary['png']} ({summary['prediction']})")
        if summary["localization"] is not None:
            print(f"e2e-wsi: localisation AUROC {summary['localization']['auroc']}")
    return 0
