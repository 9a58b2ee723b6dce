"""`e2e-wsi extract --devices N`: a Lightning DDP predict loop gives the single-process features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli import main
from e2e_wsi.features.multi_device import share_slides
from e2e_wsi.features.store import FeatureFolder

ROOT = Path(__file__).resolve().parents[2]


def test_slides_are_shared_whole_and_balanced() -> None:
    jobs = [("a", 5.0, 100), ("b", 5.0, 10), ("c", 5.0, 60), ("d", 5.0, 50), ("e", 5.0, 1)]
    shares = [share_slides(jobs, 2, rank) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(jobs)  # every slide exactly once
    loads = sorted(sum(n for *_, n in share) for share in shares)
    assert loads == [110, 111]
    assert share_slides(jobs[:1], 3, 2) == []  # more ranks than slides: some ranks idle


@pytest.mark.slow  # three CLI runs, two of them 2-process gloo DDP (~25 s on 2 shared cores)
@pytest.mark.timeout(600)
def test_two_devices_give_the_single_process_features(synth_cache: tuple[Path, Path], tmp_path: Path) -> None:
    _, cache_dir = synth_cache
    args = ["--cache", str(cache_dir), "--encoder", "resnet18", "--magnification", "5", "--input-size", "32",
            "--batch-size", "16", "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(["extract", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "e2e_wsi", "extract", *args, "--out", str(two), "--accelerator", "cpu",
           "--devices", "2"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    ids = PatchCache(cache_dir).slide_ids()
    summary = json.loads((two / "summary.json").read_text())
    assert [r["slide_id"] for r in summary["slides"]] == ids  # every slide once, in order
    assert summary["counts"] == {"ok": len(ids), "skipped": 0, "failed": 0}
    assert sorted(p.name for p in two.iterdir()) == sorted([f"{s}.h5" for s in ids] + ["summary.json"])
    one_folder, two_folder = FeatureFolder(tmp_path / "one"), FeatureFolder(two)
    for slide in ids:
        f1, c1 = one_folder.read(slide)
        f2, c2 = two_folder.read(slide)
        np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(c2, c1)
        assert two_folder.info(slide).provenance == one_folder.info(slide).provenance
    # A killed multi-device run resumes: only the missing slides are encoded, each once.
    gone = ids[1::3]
    for slide in gone:
        (two / f"{slide}.h5").unlink()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["slide_id"]: r["status"] for r in json.loads((two / "summary.json").read_text())["slides"]}
    assert rows == {s: "ok" if s in gone else "skipped" for s in ids}
    for slide in gone:
        np.testing.assert_allclose(FeatureFolder(two).read(slide)[0], one_folder.read(slide)[0], atol=1e-5)
    # The folders hold the same settings, so the one-process run resumes it: nothing left to do.
    assert main(["extract", *args, "--out", str(two)]) == 0
    assert json.loads((two / "summary.json").read_text())["counts"]["skipped"] == len(ids)
