"""A full disk while `fit` saves a checkpoint (issue 21 item 14) is one line naming the file and saying how
to resume, not a traceback. The full disk is a real write failure: the file-size limit (RLIMIT_FSIZE)
makes writes past 5 MB fail with EFBIG, as ENOSPC does on a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_full_disk_during_checkpoint_save_is_one_line(
    synth_cache: tuple[Path, Path], tmp_path: Path, tiny_args: Callable[..., list[str]]
) -> None:
    manifest, cache = synth_cache
    args = tiny_args(manifest, cache, tmp_path / "run", "--trainer.max_epochs", "1")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))
        from e2e_wsi.cli import main
        sys.exit(main({args!r}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = next(line for line in done.stderr.splitlines() if "error:" in line)
    assert (
        f"e2e-wsi fit: error: cannot write into the run folder {tmp_path / 'run'} (File too large)" in error
    )
    assert "--ckpt_path last" in error
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # no half-written checkpoint to resume from
