"""Every shipped YAML config parses through the real CLI (`--print_config` resolves it fully)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from e2e_wsi.cli import main
from e2e_wsi.tasks import task_kinds

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
PAPER = {
    "brca_subtype",
    "nsclc_subtype",
    "panda_grade",
    "camelyon_diagnosis",
    "luad_survival",
    "brca_survival",
    "blca_survival",
}


def test_paper_task_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert PAPER <= names
    assert any(n.startswith("demo_") for n in names)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    model, data = resolved["model"], resolved["data"]
    assert model["aggregator"]["class_path"].endswith("ABMILX")
    if config.stem.startswith("two_stage"):  # MIL on features: more checks in tests/features/
        assert model["encoder"]["class_path"].endswith("PrecomputedFeatures") and "features_dir" in data
        return
    assert model["encoder"]["init_args"]["arch"] == "resnet18"
    assert abs(sum(data["mag_ratios"]) - 1.0) < 1e-6 and len(data["mag_ratios"]) == len(
        data["magnifications"]
    )
    module, name = model["task"]["class_path"].rsplit(".", 1)
    task_class = getattr(importlib.import_module(module), name)
    assert task_class.kind in task_kinds()
    # data.task / data.num_classes follow model.task; an old config may still state them, consistently.
    if data.get("task") is not None:
        assert data["task"] == task_class.kind, "model task and data task disagree"
    if config.stem in PAPER or config.stem.endswith("_frozen"):  # the frozen ablation of a paper config
        assert resolved["trainer"]["precision"] == "16-mixed"  # GPU configs; the CLI falls back on CPU
    else:
        assert str(resolved["trainer"]["precision"]).startswith("32")  # CPU demo configs stay 32-bit


def test_paper_settings_follow_appendix_b3() -> None:
    """Spot-check the paper's optimisation settings (appendix B.3)."""
    cfg = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS}
    brca = cfg["brca_subtype"]
    assert brca["model"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert brca["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(8e-5)
    assert brca["trainer"]["max_epochs"] == 75 and brca["data"]["oversample"] == {0: 2, 1: 1}
    panda = cfg["panda_grade"]
    assert panda["model"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert panda["model"]["optimizer"]["init_args"] == {
        "lr": pytest.approx(2e-4),
        "weight_decay": pytest.approx(1e-5),
    }
    assert panda["trainer"]["max_epochs"] == 200 and panda["data"]["split_ratios"] == [0.7, 0.1, 0.2]
    for name in ("luad_survival", "brca_survival", "blca_survival"):
        surv = cfg[name]
        assert surv["model"]["optimizer"]["init_args"]["weight_decay"] == pytest.approx(5e-2)
        assert surv["trainer"]["max_epochs"] == 30
        assert surv["data"]["split_ratios"][2] == pytest.approx(0.3)  # paper: 30% test


# Table 7(d) multi-scale ratio r and sample size s per task family: the sub-scale gets s // r patches
# (official datasets/dataloader.py), over exactly two scales (official: 10x + 5x TCGA, 40x + 20x PANDA).
FAMILY = {
    "brca_subtype": (512, 4, [10, 5]),
    "nsclc_subtype": (512, 4, [10, 5]),
    "camelyon_diagnosis": (512, 4, [10, 5]),
    "panda_grade": (128, 4, [40, 20]),
    "luad_survival": (768, 10, [10, 5]),
    "brca_survival": (768, 10, [10, 5]),
    "blca_survival": (768, 10, [10, 5]),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_multi_scale_sampling_matches_table_7d(name: str) -> None:
    from e2e_wsi.data.sampling import allocate_counts

    data = yaml.safe_load((CONFIGS[0].parent / f"{name}.yaml").read_text())["data"]
    s, ratio, mags = FAMILY[name]
    assert data["magnifications"] == mags and len(data["mag_ratios"]) == 2
    assert sum(data["mag_ratios"]) == pytest.approx(1.0)
    assert data["sample_size"] == s
    assert allocate_counts(s, data["mag_ratios"]).tolist() == [s - s // ratio, s // ratio]


def test_paper_configs_follow_the_official_training_files() -> None:
    """Bags per step, BN group, warm-up, EMA and the aggregator variant (official config/e2e/*.yaml)."""
    cfg = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS}
    # Single-device equivalent of the official 2-GPU sync-BN run: 2 x the per-GPU batch, and the
    # BatchNorm group (checkpoint_chunk; None = the whole batch) of one synced official encoder call.
    expect = {  # batch, BN group, warm-up epochs, EMA decay (None = no EMA)
        "brca_subtype": (6, 1024, 10, 0.9997),
        "panda_grade": (16, None, 0, 0.9999),
        "luad_survival": (4, None, 5, None),
    }
    for name, (batch, group, warmup, ema) in expect.items():
        c = cfg[name]
        assert c["data"]["batch_size"] == batch and c["data"]["drop_last"] is True
        assert c["model"]["encoder"]["init_args"]["checkpoint_chunk"] == group
        assert c["model"]["lr_scheduler"]["class_path"].endswith(
            "EpochCosineLR"
        )  # official per-epoch timm cosine
        assert c["model"]["lr_scheduler"]["init_args"]["warmup_epochs"] == warmup
        assert c["model"].get("ema_decay") == ema
    for name in PAPER:
        c = cfg[name]
        agg = c["model"]["aggregator"]["init_args"]
        assert agg["alpha_init"] == "official" and agg["mil_bias"] is False
        assert c["model"]["task"]["init_args"]["head_bias"] is False  # appendix B.3: no MIL biases
        assert c["data"]["eval_crop_fraction"] == 1.0  # official: whole 256 px patch resized to 224
        assert c["data"]["mris_shortfall"] == "repeat_scale"  # official per-scale padding
        # Checkpoints are selected on the task's own metric: validation loss, which never saturates.
        assert c["trainer"]["callbacks"][0] == {"class_path": "e2e_wsi.training.callbacks.BestCheckpoint"}
        task_class = _import(c["model"]["task"]["class_path"])
        assert (task_class.monitor, task_class.monitor_mode) == ("val/loss", "min")
        assert c["data"]["split_ratios"][1] > 0  # a validation split: selection never sees the test set
    assert cfg["panda_grade"]["model"]["aggregator"]["init_args"]["ffn_variant"] == "official"
    assert cfg["luad_survival"]["model"]["aggregator"]["init_args"]["attn_bias"] is True


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_aggregator_instantiates_with_official_parameter_names(name: str) -> None:
    from e2e_wsi.models.aggregators import ABMILX

    args = yaml.safe_load((CONFIGS[0].parent / f"{name}.yaml").read_text())["model"]["aggregator"][
        "init_args"
    ]
    keys = set(ABMILX(in_dim=256, **args).state_dict())
    assert "alpha" in keys and "stem.1.bias" not in keys and "proj.bias" not in keys
    assert ("ffn.0.bias" in keys) == bool(args.get("ffn"))


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["brca_subtype", "luad_survival", "panda_grade"])
def test_paper_config_fits_end_to_end(name: str, tmp_path: Path) -> None:
    """Each task family's paper config trains (shrunk): per-epoch schedule, drop_last, TaskEarlyStopping, EMA."""
    import torch

    from tests.helpers.official import write_textured_cache

    ids = write_textured_cache(tmp_path / "cache", slides=12)
    manifest = tmp_path / "manifest.csv"
    if "survival" in name:
        rows = [f"c{i},{s},{10 + 3 * i},{i % 2}" for i, s in enumerate(ids)]
        manifest.write_text("case_id,slide_id,time,event\n" + "\n".join(rows) + "\n")
    else:
        k = 6 if name == "panda_grade" else 2  # every class needs a slide
        manifest.write_text(
            "case_id,slide_id,label\n" + "".join(f"c{i},{s},{i % k}\n" for i, s in enumerate(ids))
        )
    run = tmp_path / "run"
    code = main([
        "fit", "--config", str(CONFIGS[0].parent / f"{name}.yaml"), "--run_dir", str(run),
        "--data.manifest", str(manifest), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.magnifications", "[10, 5]", "--data.sample_size", "8", "--data.batch_size", "2",
        "--data.train_patch_size", "32", "--data.eval_patch_size", "32", "--data.num_workers", "0",
        "--data.persistent_workers", "false", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2",
        "--trainer.min_epochs", "1", "--model.encoder.init_args.weights", "none",
        "--model.encoder.init_args.checkpoint_chunk", "8", "--model.eval_chunk_size", "16",
    ])  # fmt: skip
    assert code in (0, None)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["e2e_wsi_input"] == {"channel_order": "rgb", "eval_resize": False}
    assert last["lr_schedulers"][0]["last_epoch"] == 2  # stepped once per epoch (EpochCosineLR)
