"""One-line errors of preprocess (issue 21 item 14): an include region that removes all tissue, a full
disk (staging file or LMDB), a read-only cache folder, and a predict whose cache another run is writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from e2e_wsi.annotations.geojson import AnnotationRules
from e2e_wsi.cache.preprocess import preprocess
from e2e_wsi.cache.worker import PreprocessConfig, SlideJob
from e2e_wsi.cli import main
from e2e_wsi.locks import CacheLock
from tests.helpers.slides import make_tissue_slide

CONFIG = PreprocessConfig((5.0,), patch_size=64)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("errs")
    return [make_tissue_slide(root / f"s{i}.svs", size=1024, seed=i).path for i in range(3)]


def test_an_include_region_without_tissue_says_so(slides: list[Path], tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    ring = [[0, 0], [60, 0], [60, 60], [0, 60], [0, 0]]  # a glass corner of the slide
    region = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
              "properties": {"objectType": "annotation", "classification": {"name": "Region*"}}}  # fmt: skip
    (notes / "s0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [region]}))
    config = PreprocessConfig((5.0,), patch_size=64, annotations=AnnotationRules(str(notes)))
    (row,) = preprocess(
        [SlideJob("s0", slides[0])], tmp_path / "c", config, workers=0, qc=False, progress=False
    )
    assert row["status"] == "failed" and row["reason"].startswith(
        "annotation removed all tissue: the regions"
    )
    assert "tissue-threshold" not in row["reason"]


def _limited(script: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` with files limited to ``limit`` bytes: writes beyond it fail as on a full disk."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from e2e_wsi.cli import main
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)  # fmt: skip


@pytest.mark.parametrize("limit", [40_000, 400_000])  # staging file fails / the LMDB fails
def test_a_full_disk_stops_preprocess_with_one_line(slides: list[Path], tmp_path: Path, limit: int) -> None:
    args = ["preprocess", "--slides-dir", str(slides[0].parent), "--out", str(tmp_path / "c"),
            "--magnifications", "10", "5", "--patch-size", "64", "--workers", "0", "--quiet", "--no-qc"]  # fmt: skip
    done = _limited(f"sys.exit(main({args!r}))", limit, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "Traceback" not in done.stderr
        and ("(File too large)" in lines[0] or "(mdb_txn_commit: Input/output error" in lines[0])
        and "re-run preprocess" in lines[0]
    )


def _as_non_root() -> list[str]:
    """A command prefix that drops root's right to write anywhere (root ignores a folder's mode): a user
    namespace mapping us to uid 1000, whose capabilities are cleared when it runs Python."""
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(["unshare", "--user", "--map-user=1000", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without user namespaces: root writes into read-only folders")
    return ["unshare", "--user", "--map-user=1000", "--map-group=1000"]


@pytest.mark.parametrize("inside", [False, True])  # --out to create in a read-only folder / --out read-only
def test_a_read_only_cache_is_a_clear_error(slides: list[Path], tmp_path: Path, inside: bool) -> None:
    prefix = _as_non_root()
    folder = tmp_path / "ro"
    folder.mkdir()
    out = folder / "c" if inside else folder
    folder.chmod(0o555)
    args = ["preprocess", "--slides-dir", str(slides[0].parent), "--out", str(out), "--magnifications", "5",
            "--workers", "0", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "e2e_wsi", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"cannot write the patch cache {out} (Permission denied" in done.stderr


def test_predict_on_a_cache_another_run_writes_is_refused(
    tiny_run: Path, slides: list[Path], tmp_path: Path, capsys
) -> None:
    cache = tmp_path / "cache"
    args = ["predict", "--run", str(tiny_run), "--slides", str(slides[1]), "--out", str(tmp_path / "o"),
            "--cache_dir", str(cache), "--quiet", "--no_heatmaps"]  # fmt: skip
    with CacheLock(cache / ".patches.lmdb.lock", what=f"cache {cache / 'patches.lmdb'}"):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"pid {os.getpid()}" in err and "in use by another preprocess run" in err and "Traceback" not in err
    )
