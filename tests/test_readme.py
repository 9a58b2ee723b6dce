"""The README's command lines are real: every verb it shows exists and every flag it uses is in that
verb's ``--help`` (checked against the real parsers, whatever verbs and flags the README grows)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from e2e_wsi.cli import VERBS, main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(text: str) -> list[list[str]]:
    """Command lines starting with ``e2e-wsi`` in fenced code blocks and inline code spans.

    Continuation lines (trailing ``\\``) are joined and ``#`` comments dropped.

    Returns:
        Each command as tokens, without the leading ``e2e-wsi``.
    """
    lines: list[str] = []
    in_block = False
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            lines.append(raw.strip())
        else:
            lines += [m.strip() for m in re.findall(r"`([^`]+)`", raw)]
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        else:
            joined.append(line)
    commands = []
    for line in joined:
        if not line.startswith("e2e-wsi "):
            continue
        try:
            tokens = shlex.split(line.split(" #")[0])
        except ValueError:  # prose after a command in a listing (an apostrophe): words are enough
            tokens = line.split(" #")[0].split()
        # `e2e-wsi --debug VERB ...`: --debug is the dispatcher's own flag, not the verb's.
        commands.append([t for t in tokens[1:2] if t != "--debug"] + tokens[2:])
    return commands


def flags_of(tokens: list[str]) -> list[str]:
    """The ``--flags`` of a command (``--a=b`` -> ``--a``), without ``--help``."""
    flags = [t.split("=")[0] for t in tokens if t.startswith("--") and len(t) > 2]
    return [f for f in flags if f != "--help"]


@cache
def help_text(*verb: str) -> str | None:
    """``e2e-wsi VERB [SUB] --help`` run in-process; ``None`` when it does not succeed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            status = main([*verb, "--help"])
        except SystemExit as stop:
            status = stop.code or 0
    return out.getvalue() if status == 0 else None


def test_readme_parser_finds_blocks_spans_and_continuations() -> None:
    text = (
        "Run `e2e-wsi synth --seed 1` then\n```bash\ne2e-wsi fit --config a.yaml \\\n"
        "    --trainer.devices 4   # four GPUs\npython x.py --no\n```\n"
    )
    assert readme_commands(text) == [
        ["synth", "--seed", "1"],
        ["fit", "--config", "a.yaml", "--trainer.devices", "4"],
    ]
    assert flags_of(["fit", "--a=1", "--b", "x", "--help", "-v"]) == ["--a", "--b"]


COMMANDS = readme_commands(README.read_text())
FORWARDS_TO_FIT = {"crossval"}  # `e2e-wsi crossval` passes unknown arguments to every fold's `fit`


def test_readme_shows_commands() -> None:
    verbs = {c[0] for c in COMMANDS if c}
    assert {"synth", "preprocess", "fit", "test", "heatmap"} <= verbs


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_verb_and_flags_exist(command: list[str]) -> None:
    verb = command[0]
    assert verb in VERBS, f"README uses unknown verb {verb!r}: `e2e-wsi {' '.join(command)}`"
    texts = [help_text(verb)]
    # A sub-command (`cache info`) has its own help; a plain argument (a path) has none.
    if len(command) > 1 and re.fullmatch(r"[a-z]+", command[1]):
        texts.append(help_text(verb, command[1]))
    if verb in FORWARDS_TO_FIT:  # its other arguments are fit overrides, checked against fit's parser
        texts.append(help_text("fit"))
    helps = "\n".join(t for t in texts if t)
    assert helps, f"`e2e-wsi {verb} --help` failed"
    for flag in flags_of(command):
        assert re.search(rf"(?<![\w.-]){re.escape(flag)}(?![\w.-])", helps), (
            f"README flag {flag} is not in `e2e-wsi {verb} --help` (command: e2e-wsi {' '.join(command)})"
        )


def test_help_lookup_tells_real_flags_from_made_up_ones() -> None:
    heatmap = help_text("heatmap")
    assert heatmap and "--overlap" in heatmap and "--made-up-flag" not in heatmap
    assert help_text("heatmap-nonexistent") is None
