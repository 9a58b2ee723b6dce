"""MechanismProbe: the gradient it captures is the encoder features' gradient; a real fit writes the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from e2e_wsi.cli import main
from e2e_wsi.evaluation.mechanism import gradient_share
from e2e_wsi.models.aggregators import ABMIL
from e2e_wsi.models.encoders import ResNetEncoder
from e2e_wsi.models.module import SlideModule
from e2e_wsi.training.mechanism import MechanismProbe


def test_hook_captures_the_gradient_of_the_encoder_output() -> None:
    torch.manual_seed(0)
    model = SlideModule(encoder=ResNetEncoder(), aggregator=lambda d: ABMIL(d, inner_dim=32, attn_dim=16))
    model.train()
    probe = MechanismProbe(masks_dir="unused")
    seen: dict[str, torch.Tensor] = {}

    def keep_features(module, args, output):  # the reference: autograd's own gradient of the features
        output.retain_grad()
        seen["features"] = output

    handles = [
        model.encoder.register_forward_hook(keep_features),
        model.encoder.register_forward_hook(probe._on_features),
        model.aggregator.register_forward_hook(probe._on_aggregator),
    ]
    images = torch.randint(0, 256, (2, 6, 3, 16, 16), dtype=torch.uint8)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = model(images, mask)
    torch.nn.functional.cross_entropy(out["outputs"], torch.tensor([0, 1])).backward()
    for handle in handles:
        handle.remove()
    reference = seen["features"].grad  # [12, D]
    assert probe._grad is not None and torch.equal(probe._grad, reference)
    assert probe._attention.shape == (2, 1, 6)
    assert reference.abs().sum() > 0
    # Padding rows get no gradient, so they add nothing to the total the share is taken of.
    assert reference.view(2, 6, -1)[1, 4:].abs().sum() == 0
    lesion = torch.zeros(12, dtype=torch.bool)
    lesion[[0, 7]] = True
    share, _ = gradient_share(probe._grad, lesion, mask.reshape(-1))
    norms = reference.norm(dim=1)
    assert share == pytest.approx(float((norms[0] + norms[7]) / norms[mask.reshape(-1)].sum()), rel=1e-5)


@pytest.mark.slow
def test_probe_rows_from_a_real_fit(synth_cache: tuple[Path, Path], tiny_args, tmp_path: Path) -> None:
    manifest, cache = synth_cache
    callbacks = tmp_path / "callbacks.yaml"
    probe = {
        "masks_dir": str(manifest.parent / "masks"),
        "split": "val",
        "every_n_epochs": 2,
        "probe_slides": 1,
    }
    callbacks.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {"class_path": "e2e_wsi.training.mechanism.MechanismProbe", "init_args": probe}
                    ]
                }
            }
        )
    )
    run = tmp_path / "run"
    assert main(tiny_args(manifest, cache, run, "--config", str(callbacks), "--trainer.max_epochs", "3")) == 0
    rows = [json.loads(line) for line in (run / "mechanism.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert ["probe" in r for r in rows] == [False, True, True]  # every 2nd epoch, and after the last
    assert rows[1]["probe"]["slides"] == 1  # the intermediate probe is limited to one slide
    assert rows[2]["probe"]["slides"] == 2  # the last epoch probes the whole split (2 val slides)
    for r in rows:
        train = r["train"]
        assert 0.0 < train["share_lesion"] < 0.5  # the synthetic lesions are found in the sampled patches
        assert 0.0 <= train["grad_share_lesion"] <= 1.0 and train["loss"] > 0
    final = rows[2]["probe"]
    assert 0.0 < final["top90_head"] <= 0.9 + 1e-9
    assert 0.0 <= final["att_on_lesion"] <= 1.0 and final["share_lesion"] > 0
    assert {p["slide_id"] for p in final["predictions"]} and final["nll"] > 0
