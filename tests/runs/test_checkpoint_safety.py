"""Checkpoints are loaded safely and never silently skipped (issue 12: security, silent wrong results).

A pickle-payload checkpoint (its ``__reduce__`` would create a marker folder) is refused whether it is
served over HTTP or given as a local path, and the payload never runs. ``test``/``validate``/``predict``
without ``--ckpt_path`` use the run's best checkpoint, or refuse; ``fit --ckpt_path last`` without a
checkpoint refuses; ``test --config`` of a copied run writes into the copy.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from e2e_wsi.cli import main
from e2e_wsi.runs.checkpoints import UnsafeCheckpointError, load_checkpoint


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for any command an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def evil_ckpt(tmp_path: Path, tiny_run: Path) -> tuple[Path, Path]:
    """A real checkpoint of the tiny run with a payload object added; returns (file, marker)."""
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["extra"] = _Payload(marker)
    path = tmp_path / "served" / "model.ckpt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    assert not marker.exists()
    return path, marker


@pytest.fixture
def http_server(evil_ckpt: tuple[Path, Path]) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server on 127.0.0.1 serving the payload checkpoint; yields (URL, requested paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(evil_ckpt[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/model.ckpt", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("predict", "predictions.csv", "metrics.*"))
    return dest


def test_remote_payload_checkpoint_is_refused_and_never_runs(
    tiny_run: Path,
    evil_ckpt: tuple[Path, Path],
    http_server: tuple[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where torch.hub would cache a download
    url, requests = http_server
    code = main(["test", "--config", str(tiny_run / "config.yaml"), "--run_dir", str(tmp_path / "out"),
                 "--ckpt_path", url, "--bootstrap", "10"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing remote checkpoint" in err and "download it first" in err and "Traceback" not in err
    assert not evil_ckpt[1].exists(), "the checkpoint's payload ran"
    assert requests == []  # nothing was even downloaded
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_local_payload_checkpoint_is_refused_and_never_runs(
    tiny_run: Path, evil_ckpt: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = evil_ckpt
    for verb in ("test", "fit"):
        code = main([verb, "--config", str(tiny_run / "config.yaml"), "--run_dir", str(tmp_path / verb),
                     "--ckpt_path", str(path)])  # fmt: skip
        assert code == 2, verb
        err = capsys.readouterr().err
        assert f"refusing checkpoint {path}" in err and "weights_only" in err, err
        assert not marker.exists(), "the checkpoint's payload ran"
    with pytest.raises(UnsafeCheckpointError, match="posix.mkdir"):
        load_checkpoint(path)
    assert not marker.exists()


def test_weights_only_false_is_refused(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    code = main(["test", "--config", str(tiny_run / "config.yaml"), "--run_dir", str(tmp_path / "o"),
                 "--ckpt_path", str(ckpt), "--weights_only", "false"])  # fmt: skip
    assert code == 2 and "weights_only" in capsys.readouterr().err


def test_real_checkpoints_load_under_the_allow_list(tiny_run: Path) -> None:
    for path in (tiny_run / "checkpoints").glob("*.ckpt"):
        ckpt = load_checkpoint(path)
        assert any(k.startswith("encoder.") for k in ckpt["state_dict"]), path


def test_test_without_ckpt_path_uses_the_best_checkpoint_of_the_copied_run(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy_run(tiny_run, tmp_path / "copy")
    original = tiny_run / "predictions.csv"
    before = original.stat().st_mtime_ns if original.exists() else None
    assert main(["test", "--config", str(copy / "config.yaml"), "--bootstrap", "10"]) == 0
    best = next((copy / "checkpoints").glob("best-*.ckpt"))
    assert f"checkpoint {best.resolve()}" in capsys.readouterr().out
    # Outputs land in the folder the config came from, never in the run named inside the config.
    assert (copy / "predictions.csv").is_file() and (copy / "metrics.json").is_file()
    assert (original.stat().st_mtime_ns if original.exists() else None) == before
    test_ids = pd.read_csv(copy / "splits.csv").query("split == 'test'")["slide_id"]
    assert sorted(pd.read_csv(copy / "predictions.csv")["slide_id"]) == sorted(test_ids)


@pytest.mark.parametrize("verb", ["test", "validate"])  # predict on new slides: tests/inference
def test_evaluation_without_any_checkpoint_is_refused(
    tiny_run: Path, tmp_path: Path, verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy_run(tiny_run, tmp_path / "copy")
    shutil.rmtree(copy / "checkpoints")
    assert main([verb, "--config", str(copy / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds no best checkpoint" in err and "--ckpt_path" in err and "e2e-wsi fit" in err
    assert not (copy / "predictions.csv").exists() and not (copy / "predict").exists()


def test_fit_resume_last_without_checkpoint_is_refused(
    synth_cache: tuple[Path, Path], tiny_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "empty"
    assert main(tiny_args(manifest, cache, run, "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err
    assert "holds no last checkpoint" in err and "without --ckpt_path" in err
    assert not (run / "checkpoints").exists()


def test_input_error_exits_2_without_traceback_unless_debug(
    synth_cache: tuple[Path, Path], tiny_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "mismatch"
    args = tiny_args(manifest, cache, run, "--model.task.num_classes", "3")
    assert main(args) == 2
    err = capsys.readouterr().err
    # model.task says 3 classes (the data follows it) but the manifest's labels are 0/1: a user error.
    assert "num_classes" in err and "manifest" in err and "Traceback" not in err and "--debug" in err
    # A failed fit leaves no TensorBoard events file behind.
    assert not list(run.glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="num_classes"):
        main(["--debug", *args])
    assert not list(run.glob("events.out.tfevents.*"))


def test_heatmap_refuses_the_payload_checkpoint(tiny_run: Path, evil_ckpt: tuple[Path, Path]) -> None:
    from e2e_wsi.runs import load_run

    path, marker = evil_ckpt
    with pytest.raises(UnsafeCheckpointError, match="refusing checkpoint"):
        load_run(path, tiny_run / "config.yaml")
    assert not marker.exists()
