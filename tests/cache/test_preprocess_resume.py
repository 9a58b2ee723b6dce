"""Killing `e2e-wsi preprocess` mid-run and re-running gives exactly the cache of a clean run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_wsi.cache.store import PatchCache
from tests.helpers.cache import lmdb_contents


def _manifest_with_copies(cohort: Path, root: Path, copies: int) -> Path:
    """The cohort's slides listed several times under new ids (more slides, so the kill lands mid-run)."""
    lines = ["slide_id,path,label"]
    for slide in sorted((cohort.parent / "slides").glob("*.svs")):
        for k in range(copies):
            lines.append(f"{slide.stem}-c{k},{slide},0")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _command(manifest: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "e2e_wsi.cli",
        "preprocess",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--magnifications",
        "20",
        "10",
        "--workers",
        "2",
        "--quiet",
    ]


@pytest.mark.slow  # spawns `e2e-wsi preprocess`, kills it mid-run, resumes: tens of seconds
def test_kill_then_resume_equals_clean_run(cohort: Path, tmp_path: Path) -> None:
    manifest = _manifest_with_copies(cohort, tmp_path, copies=2)  # 6 slides
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert subprocess.run(_command(manifest, clean), capture_output=True).returncode == 0

    proc = subprocess.Popen(
        _command(manifest, killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    # QC images appear as slides finish encoding, before their commit: kill once a few exist.
    while (
        len(list((killed / "qc").glob("*.png"))) < 2 and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the main writer and its workers, at an arbitrary moment
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = PatchCache(killed).slide_ids() if (killed / "patches.lmdb" / "data.mdb").exists() else []
    assert len(partial) < 6

    assert subprocess.run(_command(manifest, killed), capture_output=True).returncode == 0
    assert lmdb_contents(killed) == lmdb_contents(clean)
    cache = PatchCache(killed)
    assert len(cache.slide_ids()) == 6
    assert not any((killed / ".staging").rglob("*.bin"))
    shutil.rmtree(tmp_path)
