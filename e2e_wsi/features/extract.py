"""Encode every cached patch once and write one ``<slide_id>.h5`` per slide (the two-stage first stage).

The loop streams batches of JPEG-decoded patches from the patch cache (DataLoader workers decode while
the encoder runs), resizes/centre-crops them to the encoder's input size, normalises them with the
encoder's own statistics on the device, and writes each slide as soon as its last batch is encoded
(atomically, see :mod:`e2e_wsi.features.store`). A finished slide is skipped on the next run, so a killed
job resumes where it stopped; a slide that fails is recorded in ``summary.json`` and the others go on.
Several GPUs: ``devices=N`` (a Lightning DDP ``predict`` loop, :mod:`e2e_wsi.features.multi_device`), or
one process per device with ``shard=(i, n)`` (each writes its own summary file).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from e2e_wsi.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from e2e_wsi.errors import UserError
from e2e_wsi.features.plan import (  # noqa: F401 - ExtractConfig/plan_extraction/summary_name re-exported
    ExtractConfig,
    SlideAssembler,
    _autocast,
    _Chunks,
    _device,
    plan_extraction,
    summary_name,
)


def extract_features(
    cache_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    encoder: nn.Module,
    config: ExtractConfig = ExtractConfig(),  # noqa: B008 - frozen dataclass, safe default
    slide_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Extract features of every (or the given) cached slide into ``out_dir``.

    With ``config.devices > 1`` the slides are spread over that many devices by a Lightning ``Trainer``
    (:mod:`e2e_wsi.features.multi_device`); otherwise this process encodes them on ``config.device``.

    Args:
        cache_dir: Patch cache written by ``e2e-wsi preprocess``.
        out_dir: Feature folder; ``<slide_id>.h5`` per slide and ``summary.json``.
        encoder: Patch encoder ([N, 3, H, W] -> [N, D]) with ``out_dim`` (and ideally ``mean``/``std``,
            ``input_size``, ``describe()``); run in eval mode without gradients.
        config: Extraction settings.
        slide_ids: Subset of slides (default: all cached slides).

    Returns:
        One summary row per slide of this shard: ``slide_id``, ``status`` (ok/skipped/failed),
        ``num_patches``, ``seconds``, ``error``.
    """
    plan = plan_extraction(cache_dir, out_dir, encoder, config, slide_ids)
    if config.devices > 1:
        from e2e_wsi.features.multi_device import extract_on_devices  # Lightning: only when asked for

        return extract_on_devices(plan, encoder, config)
    device = _device(config.device)
    encoder = encoder.to(device).eval()
    mean = getattr(encoder, "mean", IMAGENET_MEAN)
    std = getattr(encoder, "std", IMAGENET_STD)
    loader = DataLoader(
        _Chunks(plan.cache, plan.jobs, config.batch_size, plan.input_size),
        batch_size=None,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    counts = {s: n for s, _, n in plan.jobs}
    bar = tqdm(total=sum(counts.values()), unit="patch", disable=not config.progress, desc="extract")
    for slide_id, feats, seconds, error in _encode_slides(
        loader, encoder, device, config.precision, mean, std
    ):
        plan.record(slide_id, feats, seconds, error, counts[slide_id])
        bar.update(counts[slide_id])
    bar.close()
    return plan.finish()


def _encode_slides(
    loader: DataLoader,
    encoder: nn.Module,
    device: torch.device,
    precision: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> Iterator[tuple[str, np.ndarray | None, float, str]]:
    """Yield ``(slide_id, features [N, D] | None, seconds, error)`` once per slide, in loader order."""
    slides = SlideAssembler()
    with torch.inference_mode():
        for item in loader:
            slide_id, feats, error = item["slide_id"], None, item["error"]
            if not slides.enter(slide_id) and not error:
                try:
                    x = normalize_images(
                        item["images"].to(device, non_blocking=True),
                        tuple(mean),
                        tuple(std),
                        getattr(encoder, "channel_order", "rgb"),  # a converted official encoder wants BGR
                    )
                    with _autocast(device, precision):
                        feats = encoder(x).float().cpu()
                except Exception as err:  # a bad batch fails its slide only
                    error = repr(err)
            done = slides.add(slide_id, item["last"], feats, error)
            if done is not None:
                yield done


def encoder_from_spec(spec: str, weights: str | None = None) -> tuple[nn.Module, int | None]:
    """Build the encoder named on the command line.

    Encoder YAMLs and run configs are checked against the allow-list of :mod:`e2e_wsi.runs.allowlist`
    before anything they name is imported or built (:func:`e2e_wsi.runs.build_encoder`).

    Args:
        spec: A registered encoder name (:func:`e2e_wsi.models.registry.list_encoders`: ``resnet18``,
            ``resnet50``, ``timm:NAME``, ``hf-hub:ORG/NAME``), a YAML file with ``class_path``/``init_args``,
            or an end-to-end run (``RUN/checkpoints/x.ckpt`` or ``RUN``, its best checkpoint): its encoder,
            built from ``RUN/config.yaml``.
        weights: ``--weights``, turned into constructor arguments by the encoder class's
            ``weights_kwargs`` (ResNet: ``none``/``imagenet``/file; timm: ``pretrained`` or a file).

    Returns:
        The encoder and the input size the spec implies (a run's ``data.eval_patch_size``), or ``None``.

    Raises:
        RefusedConfigError: If the YAML or the run's config names code outside the allow-list.
        UserError: If ``spec`` is none of the above.
    """
    from e2e_wsi.models.registry import ENCODERS, encoder_from_name, is_encoder_name
    from e2e_wsi.runs.folder import CHECKPOINT_SUFFIX, RunFolder
    from e2e_wsi.runs.loading import build_encoder, encoder_from_run, read_run_config

    if is_encoder_name(spec):  # a registered name: resnet18, timm:NAME, hf-hub:ORG/NAME, ...
        factory = ENCODERS[spec.partition(":")[0]]
        weights_kwargs = getattr(factory, "weights_kwargs", None)
        extra = weights_kwargs(weights, spec) if weights_kwargs is not None else {}
        return encoder_from_name(spec, freeze=True, **extra), None
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        node = read_run_config(path)
        key = "encoder" if "encoder" in node else ""
        return build_encoder(node.get("encoder", node), path, key), None
    if (path.suffix == CHECKPOINT_SUFFIX and path.is_file()) or (
        path.is_dir() and RunFolder.is_run_folder(path)
    ):
        return encoder_from_run(path)
    raise UserError(
        f"unknown encoder {spec!r}: use a registered name ({', '.join(ENCODERS.names())}; NAME:ARG for "
        "timm:NAME and hf-hub:ORG/NAME), an encoder YAML (class_path/init_args), a run folder RUN or a "
        "run checkpoint RUN/checkpoints/x.ckpt"
    )
