"""Which part of the two-stage ABMILX stops it learning a sparse instance signal? (issue 18, docs/results.md)

A plain PyTorch loop (no Lightning, no data pipeline) over the cohort of
``benchmarks/two_stage_sparse_signal.py`` held in memory: 80 slides of 500-1,500 isotropic Gaussian
1024-d instances, 3% of each slide's instances shifted by 4 along a class-specific unit direction;
56 slides train, 24 test; batch size 1; 12 epochs; test AUROC after every epoch. Each arm swaps one
component of the aggregator, so the table reads as an ablation:

* ``gated_abmil`` / ``gated_abmil_xavier``: the CLAM-style reference (Linear 1024->512, ReLU, dropout,
  gated tanh/sigmoid attention of width 256, linear classifier with bias; Adam 2e-4, weight decay 1e-5)
  with PyTorch's default initialisation, then with every Linear re-drawn Xavier-normal (CLAM's own
  ``initialize_weights`` convention).
* ``shipped``: configs/two_stage_abmilx.yaml of the previous release (input and output LayerNorm,
  bias-free, GELU, 8 heads, A+, alpha 1, AdamW 2e-4, Xavier).
* ``one_head*``: the same module with 1 head and no A+, then without the input LayerNorm, the output
  LayerNorm, both, with biases, with ReLU.
* ``official_feat*``: the official two-stage settings (no mil_norm, biases, ReLU, attention bias,
  AdamW 1e-4; 1 head, no A+), Xavier as the official module draws it, then PyTorch's default init for
  every Linear, or only the stem, the attention MLP or the head.
* ``recipe``: configs/two_stage_abmilx.yaml now (8 heads, A+, official alpha, no LayerNorm, biases,
  ReLU, PyTorch init, AdamW 2e-4).

Usage::

    nice -n 10 .venv/bin/python benchmarks/two_stage_ablation.py                 # every arm, seed 0
    nice -n 10 .venv/bin/python benchmarks/two_stage_ablation.py --arms recipe shipped --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from e2e_wsi.models.aggregators import ABMILX
from e2e_wsi.models.aggregators._common import init_weights
from e2e_wsi.models.heads import ClassificationHead

TRAIN, TEST = range(0, 56), range(56, 80)


def cohort(seed: int = 0, slides: int = 80, dim: int = 1024, share: float = 0.03, shift: float = 4.0):
    """Bags [N_i, dim] and labels; class c shifts ``share`` of a slide's instances by ``shift * d_c``."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(2, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bags, labels = [], []
    for i in range(slides):
        label, n = i % 2, int(rng.integers(500, 1500))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x[rng.choice(n, max(1, round(share * n)), replace=False)] += shift * directions[label]
        bags.append(torch.from_numpy(x))
        labels.append(label)
    order = rng.permutation(slides)
    return [bags[i] for i in order], [labels[i] for i in order]


class GatedABMIL(nn.Module):
    """CLAM-style gated attention MIL: features [1, N, D] -> logits [1, 2]."""

    def __init__(self, dim: int = 1024) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Dropout(0.25))
        self.tanh = nn.Sequential(nn.Linear(512, 256), nn.Tanh(), nn.Dropout(0.25))
        self.gate = nn.Sequential(nn.Linear(512, 256), nn.Sigmoid(), nn.Dropout(0.25))
        self.score = nn.Linear(256, 1)
        self.classifier = nn.Linear(512, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        weights = torch.softmax(self.score(self.tanh(h) * self.gate(h)).squeeze(-1), dim=-1)
        return self.classifier(torch.einsum("bn,bnd->bd", weights, h))


class WithHead(nn.Module):
    """ABMILX + ClassificationHead: features [1, N, D] -> logits [1, 2]."""

    def __init__(self, head_bias: bool = False, **aggregator: object) -> None:
        super().__init__()
        self.aggregator = ABMILX(1024, **aggregator)
        self.head = ClassificationHead(self.aggregator.out_dim, 2, bias=head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.aggregator(x)[0])


def torch_init(model: nn.Module, prefix: str = "") -> nn.Module:
    """Back to nn.Linear's default initialisation for the Linears whose name starts with ``prefix``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefix):
            module.reset_parameters()
    return model


def one_head(no_in: bool = False, no_out: bool = False, **kw: object) -> Callable[[], nn.Module]:
    """ABMILX with 1 head, no A+ (shipped settings unless overridden), optionally without a LayerNorm."""

    def make() -> nn.Module:
        args = {"inner_dim": 512, "heads": 1, "dropout": 0.25, "attn_plus": False, **kw}
        model = WithHead(**args)
        if no_in:
            model.aggregator.stem[0] = nn.Identity()
        if no_out:
            model.aggregator.norm_out = nn.Identity()
        return model

    return make


OFFICIAL_FEAT = {
    "no_in": True,
    "no_out": True,
    "mil_bias": True,
    "head_bias": True,
    "act": "relu",
    "attn_bias": True,
}


def adamw(lr: float) -> Callable:
    return lambda params: torch.optim.AdamW(params, lr, weight_decay=0.0)


ARMS: dict[str, tuple[Callable[[], nn.Module], Callable]] = {
    "gated_abmil": (GatedABMIL, lambda p: torch.optim.Adam(p, 2e-4, weight_decay=1e-5)),
    "gated_abmil_xavier": (lambda: GatedABMIL().apply(init_weights), lambda p: torch.optim.Adam(p, 2e-4, weight_decay=1e-5)),
    "shipped": (lambda: WithHead(inner_dim=512, heads=8, dropout=0.25, attn_plus=True, alpha_init=1.0), adamw(2e-4)),
    "shipped_torch_init": (lambda: torch_init(WithHead(inner_dim=512, heads=8, dropout=0.25, attn_plus=True, alpha_init=1.0)), adamw(2e-4)),
    "one_head": (one_head(), adamw(2e-4)),
    "one_head_no_input_ln": (one_head(no_in=True), adamw(2e-4)),
    "one_head_no_output_ln": (one_head(no_out=True), adamw(2e-4)),
    "one_head_no_ln": (one_head(no_in=True, no_out=True), adamw(2e-4)),
    "one_head_biases": (one_head(mil_bias=True, head_bias=True), adamw(2e-4)),
    "one_head_relu": (one_head(act="relu"), adamw(2e-4)),
    "official_feat": (one_head(**OFFICIAL_FEAT), adamw(1e-4)),
    "official_feat_torch_init": (lambda: torch_init(one_head(**OFFICIAL_FEAT)()), adamw(1e-4)),
    "official_feat_torch_init_stem": (lambda: torch_init(one_head(**OFFICIAL_FEAT)(), "aggregator.stem"), adamw(1e-4)),
    "official_feat_torch_init_attention": (lambda: torch_init(one_head(**OFFICIAL_FEAT)(), "aggregator.attention"), adamw(1e-4)),
    "official_feat_torch_init_head": (lambda: torch_init(one_head(**OFFICIAL_FEAT)(), "head"), adamw(1e-4)),
    "recipe": (lambda: WithHead(head_bias=True, inner_dim=512, heads=8, dropout=0.25, attn_plus=True, alpha_init="official",
                                act="relu", mil_bias=True, input_norm=False, output_norm=False, weight_init="torch"), adamw(2e-4)),
}  # fmt: skip


def train(arm: str, data: tuple[list, list], seed: int, epochs: int) -> list[tuple[float, float]]:
    """(mean training loss, test AUROC) after each epoch."""
    bags, labels = data
    make, optimizer = ARMS[arm]
    torch.manual_seed(seed)
    model = make()
    opt = optimizer(model.parameters())
    curve = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for i in torch.randperm(len(TRAIN), generator=torch.Generator().manual_seed(epoch)).tolist():
            loss = F.cross_entropy(model(bags[TRAIN[i]][None]), torch.tensor([labels[TRAIN[i]]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            probs = torch.tensor([torch.softmax(model(bags[i][None]), -1)[0, 1].item() for i in TEST])
        auroc = float(binary_auroc(probs, torch.tensor([labels[i] for i in TEST])))
        curve.append((round(total / len(TRAIN), 4), round(auroc, 3)))
    return curve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="model seeds (default 0)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per arm and seed here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = cohort()
    for seed in a.seeds:
        for arm in a.arms:
            start = time.perf_counter()
            curve = train(arm, data, seed, a.epochs)
            row = {"arm": arm, "seed": seed, "final_train_loss": curve[-1][0], "final_test_auroc": curve[-1][1],
                   "best_test_auroc": max(c[1] for c in curve), "curve": curve, "wall_s": round(time.perf_counter() - start)}  # fmt: skip
            print(json.dumps(row), flush=True)
            if a.out is not None:
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
