"""The exported graph: encoder + aggregator + head of a run, one bag of any size in, prediction and
attention out, with everything a runtime needs recorded in ``model.json``.

Graph (both formats):

* input ``patches``: uint8 [N, 3, S, S] RGB patches already resized the way the run evaluates
  (``model.json`` ``eval_resize``), N dynamic (>= 1). Normalisation with the encoder's ``mean``/``std``
  happens inside the graph. Feature runs take ``features`` float32 [N, D] instead.
* outputs the task's one prediction, named by its spec's ``prediction_keys``: ``probs`` [1, K]
  (classification, grading; softmax of the head), ``risk`` [1] (survival) or ``pred`` [1] (regression),
  and ``attention`` [1, H, N] (the aggregator's per-head attention).

The wrapper calls the run's own modules, so ABMILX keeps its maths (its fused SDPA path exports as ONNX
``scaled_dot_product_attention`` decomposition); :func:`verify` compares the exported file with PyTorch
on several bag sizes and the export is refused above ``TOLERANCE``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from e2e_wsi.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2e_wsi.models.encoders import PrecomputedFeatures
from e2e_wsi.tasks import get_task_spec

FORMATS = ("onnx", "torchscript")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
TOLERANCE = 1e-4
# Bag sizes the exported file is checked on: one patch, an odd size, and more than the tracing example.
VERIFY_SIZES = (1, 7, 33)


class ExportGraph(nn.Module):
    """One bag through a trained ``SlideModule``'s parts (EMA weights when the run kept them).

    Args:
        module: The trained model in eval mode.

    Shapes:
        forward(x uint8 [N, 3, S, S] | float [N, D]) -> (probs [1, K] | risk [1] | pred [1],
        attention [1, H, N]).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        encoder, aggregator, head = module._parts()
        self.features_in = isinstance(encoder, PrecomputedFeatures)
        self.encoder = encoder
        self.aggregator = aggregator
        self.head = head
        self.task = module.task
        (self.prediction_key,) = get_task_spec(module.task.kind).prediction_keys
        mean = torch.tensor(getattr(encoder, "mean", IMAGENET_MEAN), dtype=torch.float32)
        std = torch.tensor(getattr(encoder, "std", IMAGENET_STD), dtype=torch.float32)
        # uint8 in [0, 255]: (x / 255 - mean) / std folded into one subtract and one divide.
        self.register_buffer("mean255", (mean * 255.0).view(1, 3, 1, 1))
        self.register_buffer("std255", (std * 255.0).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = x.float() if self.features_in else self.encoder((x.float() - self.mean255) / self.std255)
        slide, attention = self.aggregator(feats.unsqueeze(0), None)
        return self.task.predict(self.head(slide))[self.prediction_key], attention


def example_input(graph: ExportGraph, size: int, n: int, dim: int | None, seed: int = 0) -> Tensor:
    """A random bag of ``n`` patches (uint8 [n, 3, size, size]) or features (float [n, dim])."""
    gen = torch.Generator().manual_seed(seed)
    if graph.features_in:
        return torch.randn(n, int(dim or 0), generator=gen)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def sha256_of(path: Any) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
