"""Configs from run folders may name only allow-listed classes (issue 21, items 1-3).

Each attack of the issue is reproduced on a copy of a real trained run: a ``subprocess.call`` scheduler in
``RUN/config.yaml`` for ``predict --run``, the aggregator variant through ``heatmap --ckpt_path``,
``test --config`` and a cross-validation ensemble, ``os.system`` in an encoder YAML and in a run's
encoder for ``extract``, and ``LambdaCallback`` in a run config. The command is ``touch MARKER``: each
test asserts that the marker is never created and that the error names the key and the class.
``test_the_attacks_run_without_the_allow_list`` shows the tests discriminate: with the allow-list
switched off, the same configs do run the command.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e_wsi.cli import main
from e2e_wsi.runs import RunFolder, allowlist, load_run
from e2e_wsi.runs.allowlist import (
    RefusedConfigError,
    check_config,
    check_parsed,
    checked_command_configs,
    config_arguments,
    is_allowed,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _shell(marker: Path) -> dict[str, Any]:
    """The issue's payload: ``subprocess.call("touch MARKER", shell=True)``."""
    return {"class_path": "subprocess.call", "init_args": {"args": f"touch {marker}", "shell": True}}


def _copy_run(src: Path, dst: Path, edit: dict[str, Any] | None = None) -> RunFolder:
    """A copy of a run folder (config, split, preprocessing, last checkpoint) with ``edit`` applied."""
    run, source = RunFolder(dst), RunFolder(src)
    run.checkpoints_dir.mkdir(parents=True)
    for path in (source.splits, source.preprocess):
        shutil.copy(path, run.root / path.name)
    shutil.copy(source.checkpoint("last.ckpt"), run.checkpoint("last.ckpt"))
    config = yaml.safe_load(source.config.read_text())
    for dotted, value in (edit or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    run.config.write_text(yaml.safe_dump(config))
    return run


def _refused(capsys: pytest.CaptureFixture, status: int, key: str, cls: str) -> None:
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"refusing {key} = '{cls}'" in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ attacks through verbs
def test_predict_run_refuses_a_shell_scheduler(tiny_run: Path, synth_cache, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    run = _copy_run(tiny_run, tmp_path / "run", {"model.lr_scheduler": _shell(marker)})
    manifest, _ = synth_cache
    status = main(
        ["predict", "--run", str(run.root), "--manifest", str(manifest), "--out", str(tmp_path / "o")]
    )
    _refused(capsys, status, "model.lr_scheduler", "subprocess.call")
    assert not marker.exists()


def test_heatmap_refuses_a_shell_aggregator(tiny_run: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    run = _copy_run(tiny_run, tmp_path / "run", {"model.aggregator": _shell(marker)})
    status = main(["heatmap", "--ckpt_path", str(run.checkpoint("last.ckpt")), "--slide", "x"])
    _refused(capsys, status, "model.aggregator", "subprocess.call")
    assert not marker.exists()


def test_test_config_refuses_a_shell_aggregator(tiny_run: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    run = _copy_run(tiny_run, tmp_path / "run", {"model.aggregator": _shell(marker)})
    status = main(["test", "--config", str(run.config), "--bootstrap", "10"])
    _refused(capsys, status, "model.aggregator", "subprocess.call")
    assert not marker.exists()
    assert not run.predictions.exists()


def test_crossval_ensemble_refuses_a_shell_aggregator_in_one_fold(
    tiny_run: Path, synth_cache, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    _copy_run(tiny_run, tmp_path / "cv" / "fold_0")
    _copy_run(tiny_run, tmp_path / "cv" / "fold_1", {"model.aggregator": _shell(marker)})
    manifest, _ = synth_cache
    args = [
        "predict",
        "--run",
        str(tmp_path / "cv"),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "o"),
    ]
    _refused(capsys, main(args), "model.aggregator", "subprocess.call")
    assert not marker.exists()


def test_extract_refuses_os_system_in_an_encoder_yaml(synth_cache, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    encoder = tmp_path / "encoder.yaml"
    encoder.write_text(
        yaml.safe_dump({"class_path": "os.system", "init_args": {"command": f"touch {marker}"}})
    )
    _, cache = synth_cache
    status = main(["extract", "--cache", str(cache), "--out", str(tmp_path / "f"), "--encoder", str(encoder)])
    err = capsys.readouterr().err
    assert status == 2 and "refusing <top> = 'os.system'" in err, err
    assert not marker.exists()


def test_extract_refuses_os_system_as_a_runs_encoder(
    tiny_run: Path, synth_cache, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    evil = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    run = _copy_run(tiny_run, tmp_path / "run", {"model.encoder": evil})
    _, cache = synth_cache
    args = ["extract", "--cache", str(cache), "--out", str(tmp_path / "f"), "--encoder", str(run.root)]
    status = main(args)
    err = capsys.readouterr().err
    assert status == 2 and "refusing model.encoder = 'os.system'" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("class_path", ["lightning.pytorch.callbacks.LambdaCallback", "LambdaCallback"])
def test_a_run_config_may_not_hold_a_lambda_callback(
    tiny_run: Path, tmp_path: Path, capsys, class_path: str
) -> None:
    """Full path: refused on the YAML data; short name: refused once jsonargparse resolved it."""
    marker = tmp_path / "MARKER"
    callback = {"class_path": class_path, "init_args": {"on_test_start": "os.system"}}
    run = _copy_run(tiny_run, tmp_path / "run", {"trainer.callbacks": [callback]})
    status = main(["test", "--config", str(run.config), "--bootstrap", "10"])
    err = capsys.readouterr().err
    assert status == 2 and "refusing trainer.callbacks[0]" in err and "LambdaCallback" in err, err
    assert not marker.exists() and not run.predictions.exists()


def test_fit_resuming_from_a_run_config_checks_it(tiny_run: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    run = _copy_run(tiny_run, tmp_path / "run", {"model.lr_scheduler": _shell(marker)})
    status = main(["fit", "--config", str(run.config), "--ckpt_path", "last"])
    _refused(capsys, status, "model.lr_scheduler", "subprocess.call")
    assert not marker.exists()


def test_the_attacks_run_without_the_allow_list(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests above discriminate: with every class allowed, loading the run executes the command."""
    marker = tmp_path / "MARKER"
    run = _copy_run(tiny_run, tmp_path / "run", {"model.lr_scheduler": _shell(marker)})
    monkeypatch.setattr(allowlist, "is_allowed", lambda _path: True)
    try:
        load_run(run.root)
    except Exception:  # the payload returns an int where a scheduler was expected; it ran already
        pass
    assert marker.exists()


# ------------------------------------------------------------------------------------- the checker
@pytest.mark.parametrize(
    ("node", "key", "cls"),
    [
        (
            {"model": {"lr_scheduler": {"class_path": "subprocess.call"}}},
            "model.lr_scheduler",
            "subprocess.call",
        ),
        ({"model": {"optimizer": "os.system"}}, "model.optimizer", "os.system"),  # callable as a string
        (
            {
                "model": {
                    "aggregator": {
                        "class_path": "e2e_wsi.models.aggregators.ABMILX",
                        "init_args": {"act": {"class_path": "os.system"}},
                    }
                }
            },
            "model.aggregator.act",
            "os.system",
        ),  # fmt: skip
        (
            {
                "model": {
                    "aggregator": {
                        "class_path": "e2e_wsi.models.aggregators.ABMILX",
                        "dict_kwargs": {"hook": "builtins.exec"},
                    }
                }
            },
            "model.aggregator.hook",
            "builtins.exec",
        ),  # fmt: skip
        (
            {
                "model": {
                    "lr_scheduler": {
                        "class_path": "torch.optim.lr_scheduler.LambdaLR",
                        "init_args": {"lr_lambda": "os.getpid"},
                    }
                }
            },
            "model.lr_scheduler",
            "torch.optim.lr_scheduler.LambdaLR",
        ),  # fmt: skip
        (
            {"trainer": {"callbacks": [{"class_path": "LambdaCallback"}]}},
            "trainer.callbacks[0]",
            "LambdaCallback",
        ),
        ({"model": {"encoder": {"class_path": "e2e_wsi.cli.main"}}}, "model.encoder", "e2e_wsi.cli.main"),
        ({"model": {"encoder": "nested.yaml"}}, "model.encoder", "nested.yaml"),  # a nested config file
        ({"data": {"manifest": "test.csv", "tag": "vit_small_patch16_224.augreg_in21k"}}, "", ""),  # data
    ],
)
def test_every_code_reference_is_checked(node: dict, key: str, cls: str) -> None:
    if not cls:
        check_config(node, "c.yaml")
        return
    with pytest.raises(RefusedConfigError) as err:
        check_config(node, "c.yaml")
    assert f"c.yaml: refusing {key} = '{cls}'" in str(err.value)


def test_nested_config_files_are_refused(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """``model: model.yaml`` makes jsonargparse read that file as the model section: never from a run."""
    marker = tmp_path / "MARKER"
    run = _copy_run(tiny_run, tmp_path / "run", {"model": "model.yaml"})
    (run.root / "model.yaml").write_text(yaml.safe_dump({"aggregator": _shell(marker)}))
    status = main(["test", "--config", str(run.config), "--bootstrap", "10"])
    err = capsys.readouterr().err
    assert status == 2 and "refusing model = 'model.yaml'" in err and "nested config files" in err, err
    assert not marker.exists()


def test_config_options_of_every_section_are_checked(tiny_run: Path, tmp_path: Path) -> None:
    evil = tmp_path / "model.yaml"
    evil.write_text(yaml.safe_dump({"lr_scheduler": {"class_path": "subprocess.call"}}))
    args = ["-c", str(RunFolder(tiny_run).config), "--model", str(evil), "--model.eval_chunk_size", "8"]
    assert config_arguments(args) == [(str(RunFolder(tiny_run).config), ""), (str(evil), "model")]
    with pytest.raises(RefusedConfigError, match=r"refusing model.lr_scheduler = 'subprocess.call'"):
        checked_command_configs("predict", config_arguments(args))


def test_short_names_are_checked_once_resolved() -> None:
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    parsed = parser.parse_object({"callbacks": [{"class_path": "LambdaCallback"}]})
    assert parsed.callbacks[0].class_path == "lightning.pytorch.callbacks.LambdaCallback"
    with pytest.raises(RefusedConfigError, match=r"refusing callbacks\[0\] = 'lightning.pytorch.callbacks"):
        check_parsed(parsed, "c.yaml")


def test_shipped_configs_and_real_run_configs_pass(tiny_run: Path) -> None:
    for config in [*sorted(CONFIGS.glob("*.yaml")), RunFolder(tiny_run).config]:
        check_config(yaml.safe_load(config.read_text()), config)
    assert is_allowed("torch.optim.AdamW") and is_allowed("lightning.pytorch.callbacks.EarlyStopping")
    assert is_allowed("e2e_wsi.models.aggregators.ABMILX") and is_allowed("ABMILX")
    assert not is_allowed("torch.optim.lr_scheduler.LambdaLR") and not is_allowed("e2e_wsi.cli.main")


def test_fit_trusts_configs_outside_run_folders(tiny_run: Path, tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "LambdaCallback"}]}}))
    assert checked_command_configs("fit", [(str(own), "")]) == []  # the user's own config: trusted
    with pytest.raises(RefusedConfigError):
        checked_command_configs("test", [(str(own), "")])  # evaluating: always checked
    in_run = RunFolder(tiny_run).config
    assert checked_command_configs("fit", [(str(in_run), "")]) == [in_run]
