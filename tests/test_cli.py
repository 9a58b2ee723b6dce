"""The `e2e-wsi` dispatcher: in-process entry, verb listing, errors, and the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_wsi.cli import VERBS, main

VERB_NAMES = (
    "synth",
    "preprocess",
    "cache",
    "extract",
    "fit",
    "validate",
    "test",
    "predict",
    "export",
    "crossval",
    "evaluate",
    "heatmap",
    "convert",
)


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERB_NAMES:
        assert f"  {verb} " in out, verb
    assert set(VERBS) == set(VERB_NAMES)


def test_no_arguments_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "usage: e2e-wsi VERB" in capsys.readouterr().out


def test_unknown_verb_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'trian'" in err and "fit" in err


def test_every_verb_resolves_to_a_callable() -> None:
    import importlib

    for verb, (target, _) in VERBS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), verb


def test_console_script_runs() -> None:
    exe = shutil.which(
        "e2e-wsi", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    )
    assert exe is not None, "the e2e-wsi console script is not installed"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "preprocess" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "e2e_wsi", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("e2e-wsi ")


def test_input_errors_exit_2_with_the_message_and_debug_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv"
    assert main(["evaluate", "--predictions", str(missing)]) == 2  # raised by the verb, reported here
    capsys.readouterr()
    # A verb that lets a FileNotFoundError through: the dispatcher prints it and exits 2.
    code = main(["test", "--run_dir", str(tmp_path / "run"), "--data.manifest", str(missing),
                 "--data.cache_dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "e2e-wsi test: error:" in err and "Traceback" not in err and "--debug" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "test", "--run_dir", str(tmp_path / "run"), "--data.manifest", str(missing),
              "--data.cache_dir", str(tmp_path)])  # fmt: skip
    assert "--debug" in (main(["--help"]), capsys.readouterr().out)[1]
