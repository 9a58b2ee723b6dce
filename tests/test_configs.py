"""Every shipped YAML config parses through the real CLI (`--print_config` resolves it fully)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from e2e_wsi.cli import main

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
    task = model["task"]["class_path"].rsplit(".", 1)[-1]
    kind = {
        "ClassificationTask": "classification",
        "GradingTask": "grading",
        "DiscreteSurvivalTask": "survival",
        "CoxSurvivalTask": "survival",
    }[task]
    assert data["task"] == kind, "model task and data task disagree"
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
        assert surv["trainer"]["max_epochs"] == 30 and surv["data"]["split_ratios"] == [0.7, 0.0, 0.3]
