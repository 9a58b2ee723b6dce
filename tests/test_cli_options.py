"""One command-line style: every verb's options, both spellings, help with defaults, one error path."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from e2e_wsi.cli import VERBS, main
from e2e_wsi.cli_common import ArgumentParser, canonical, canonical_argv, hyphenated, option_names

# Verbs driven by LightningCLI (jsonargparse): they have no argparse parser; see the tests further down.
LIGHTNING_VERBS = {"fit", "validate", "test"}
# Values that parse for options whose type is stricter than "any string" (keyed by dest).
SAMPLES = {"shard": "0/2", "bootstrap": "10", "overlap": "0.5", "saturation_threshold": "otsu"}


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for verb, (target, _) in VERBS.items():
        module = importlib.import_module(target.split(":")[0])
        if verb in LIGHTNING_VERBS:
            continue
        assert hasattr(module, "build_parser"), f"{verb}: its module needs build_parser() (cli_common)"
        parsers[verb] = module.build_parser()
    return parsers


PARSERS = verb_parsers()


def _leaves(
    verb: str, parser: argparse.ArgumentParser
) -> list[tuple[str, list[str], argparse.ArgumentParser]]:
    """(name, argv prefix, parser) of the verb and of each of its sub-commands (``cache info``)."""
    out = [(verb, [], parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out = [(f"{verb} {name}", [name], sub) for name, sub in action.choices.items()]
    return out


LEAVES = [leaf for verb, parser in PARSERS.items() for leaf in _leaves(verb, parser)]


def _value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:  # a choice other than the default, so the test sees the value was taken
        return [str(next(c for c in action.choices if c != action.default))]
    if action.dest in SAMPLES:
        return [SAMPLES[action.dest]]
    if action.type in (int, float):
        default = action.default if isinstance(action.default, (int, float)) else 0
        return [str(default + 3)]
    return ["x"]


def _required_argv(parser: argparse.ArgumentParser, skip: argparse.Action) -> list[str]:
    """Values for every required option and positional (one member of a required group), except ``skip``."""
    argv: list[str] = []
    covered = {
        a for g in parser._mutually_exclusive_groups if skip in g._group_actions for a in g._group_actions
    }
    for group in parser._mutually_exclusive_groups:
        if group.required and not covered.intersection(group._group_actions):
            first = group._group_actions[0]
            argv += [first.option_strings[0], *_value(first)]
            covered.update(group._group_actions)
    for action in parser._actions:
        if action is skip or action in covered or isinstance(action, argparse._SubParsersAction):
            continue
        if not action.option_strings:
            argv += _value(action)
        elif action.required:
            argv += [action.option_strings[0], *_value(action)]
    return argv


@pytest.mark.parametrize(("name", "prefix", "parser"), LEAVES, ids=[leaf[0] for leaf in LEAVES])
def test_every_option_has_help_with_its_default_and_both_spellings(
    name: str, prefix: list[str], parser: argparse.ArgumentParser
) -> None:
    assert isinstance(parser, ArgumentParser), f"{name}: build it with e2e_wsi.cli_common.ArgumentParser"
    text = parser.format_help()
    for action in option_names(parser):
        longs = [s for s in action.option_strings if s.startswith("--")]
        assert action.help and action.help.strip(), f"{name} {longs[0]}: no help text"
        assert longs[0] == canonical(longs[0]), f"{name}: {longs[0]} is not the underscore spelling"
        for spelling in (canonical(longs[0]), hyphenated(longs[0])):
            assert spelling in action.option_strings, f"{name}: {spelling} is not accepted"
        shown = parser._get_formatter()._get_help_string(action)
        assert "default" in shown.lower() or "(required)" in shown, f"{name} {longs[0]}: default not shown"
        assert longs[0] in text
        # Both spellings parse to the same value.
        values = _value(action)
        parsed = [
            vars(parser.parse_args([*_required_argv(parser, action), spelling, *values]))
            for spelling in (canonical(longs[0]), hyphenated(longs[0]))
        ]
        assert parsed[0] == parsed[1], f"{name}: {longs[0]} and {hyphenated(longs[0])} parse differently"
        assert parsed[0][action.dest] != action.default, f"{name} {longs[0]}: the value was not taken"


def test_the_shared_options_have_one_name_in_every_verb() -> None:
    """--ckpt_path (predict said --ckpt) and --quiet (extract said --no-progress) accept the old names."""
    predict, extract = PARSERS["predict"], PARSERS["extract"]
    ns = predict.parse_args(
        ["--ckpt", "a.ckpt", "b.ckpt", "--slides", "s.svs", "--out", "o", "--no-progress"]
    )
    assert ns.ckpt_path == ["a.ckpt", "b.ckpt"] and ns.quiet
    ns = extract.parse_args(["--cache", "c", "--out", "o", "--encoder", "resnet18", "--no_progress"])
    assert ns.quiet
    assert (
        PARSERS["preprocess"]
        .parse_args(
            ["--slides-dir", "d", "--out", "o", "--magnifications", "10", "--patch-size", "64", "--quiet"]
        )
        .patch_size
        == 64
    )


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """No docstring markup (``code``, :func:) in any verb's --help."""
    for name, _, parser in LEAVES:
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text and ":mod:" not in text, name
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "e2e-wsi predict --run RUN" in out and "``" not in out and "(default: none)" in out


def test_lightning_verbs_take_hyphenated_options() -> None:
    argv = ["--run-dir", "r", "--trainer.max-epochs=3", "--data.cache-dir", "my-cache", "--ckpt", "last",
            "--", "--not-an-option"]  # fmt: skip
    assert canonical_argv(argv) == [
        "--run_dir", "r", "--trainer.max_epochs=3", "--data.cache_dir", "my-cache", "--ckpt_path", "last",
        "--", "--not-an-option",
    ]  # fmt: skip


@pytest.mark.slow
def test_fit_parses_a_hyphenated_option_and_its_help_starts_with_the_common_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from e2e_wsi.training.cli import fit_main

    with pytest.raises(SystemExit):
        fit_main(["--trainer.max-epochs", "3", "--run-dir", "somewhere", "--print_config"])
    out = capsys.readouterr().out
    assert "max_epochs: 3" in out and "run_dir: somewhere" in out
    with pytest.raises(SystemExit):
        fit_main(["--help"])
    head = capsys.readouterr().out.splitlines()[:16]
    assert head[0] == "usage: e2e-wsi fit [--config FILE] [--OPTION VALUE ...]"
    assert any(line.startswith("  --trainer.max_epochs N") for line in head)


def test_a_verb_raises_its_user_error_and_the_dispatcher_reports_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The verbs no longer catch their own errors: one line and exit 2, the traceback with --debug."""
    from e2e_wsi.errors import UserError
    from e2e_wsi.locks import CacheLock

    args = ["cache", "info", str(tmp_path / "absent")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("e2e-wsi cache: error:") and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", *args])
    # A locked cache (a concurrent preprocess) is a user error too, not a traceback.
    with CacheLock(tmp_path / ".lock", "patches.lmdb"):
        from e2e_wsi.locks import CacheLockedError

        with pytest.raises(CacheLockedError) as info, CacheLock(tmp_path / ".lock", "patches.lmdb"):
            pass
    assert isinstance(info.value, UserError)
