"""Two `fit` into one run folder (issue 21 item 12): the second is refused, naming the holder, and writes
nothing into the folder; the lock is released when `fit` ends."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from e2e_wsi.cli import main
from e2e_wsi.runs.folder import RunFolder


def test_a_second_fit_into_a_locked_run_folder_is_refused(
    synth_cache: tuple[Path, Path],
    tmp_path: Path,
    tiny_args: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "run"
    with RunFolder(run).fit_lock():  # what a running `fit` holds
        assert main(tiny_args(manifest, cache, run, "--trainer.max_epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "in use by another `e2e-wsi fit`" in err and f"pid {os.getpid()}" in err and "--run_dir" in err
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    # Released after a command: two fits in a row (resume) are fine.
    assert main(tiny_args(manifest, cache, run, "--trainer.max_epochs", "1")) == 0
    assert main(tiny_args(manifest, cache, run, "--trainer.max_epochs", "2", "--ckpt_path", "last")) == 0
