"""The `e2e-wsi` dispatcher: in-process entry, verb listing, errors, and the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_wsi.cli import VERBS, main


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in (
        "synth",
        "preprocess",
        "cache",
        "extract",
        "fit",
        "validate",
        "test",
        "predict",
        "evaluate",
        "heatmap",
    ):
        assert f"  {verb} " in out, verb
    assert set(VERBS) == {
        "synth",
        "preprocess",
        "cache",
        "extract",
        "fit",
        "validate",
        "test",
        "predict",
        "evaluate",
        "heatmap",
    }


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
