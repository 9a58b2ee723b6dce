"""What every ``e2e-wsi`` verb's command line shares: option spelling, help format, progress switch.

One spelling rule for every verb: the canonical name of an option uses underscores (``--cache_dir``,
``--patch_size``, ``--ckpt_path``), as LightningCLI/jsonargparse spell theirs, and the hyphen spelling
(``--patch-size``) is accepted everywhere as an alias. argparse verbs get this from
:class:`ArgumentParser` (both spellings registered on the same action, whichever one the verb's code
wrote); the LightningCLI verbs (fit, validate, test, predict --config) get it from
:func:`canonical_argv`, which rewrites hyphenated option names before jsonargparse sees them.

Help: :class:`HelpFormatter` shows each option's default (or "required"), keeps descriptions as written
(plain text, no docstring markup) and lists both spellings of an option once.

Errors are not handled here: a verb raises :class:`e2e_wsi.errors.UserError` (or another user error, see
``e2e_wsi.cli.is_user_error``) and the dispatcher reports it once.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

# Options shared by several verbs: (canonical name, aliases). A verb that offers the feature spells it so.
SHARED_ALIASES: dict[str, tuple[str, ...]] = {
    "--quiet": ("--no_progress",),  # extract said --no-progress, preprocess/predict --quiet
    "--ckpt_path": ("--ckpt",),  # predict said --ckpt, every other verb --ckpt_path
}


def canonical(option: str) -> str:
    """``--patch-size`` -> ``--patch_size``; short options and positionals are returned unchanged."""
    if not option.startswith("--") or option == "--":
        return option
    return "--" + option[2:].replace("-", "_")


def hyphenated(option: str) -> str:
    """``--patch_size`` -> ``--patch-size`` (the accepted alias of a canonical long option)."""
    if not option.startswith("--"):
        return option
    return "--" + option[2:].replace("_", "-")


def spellings(option: str) -> list[str]:
    """Every accepted spelling of a long option, canonical first, then its aliases' spellings."""
    first = canonical(option)
    names = [first, *SHARED_ALIASES.get(first, ())]
    out: list[str] = []
    for name in names:
        for spelling in (canonical(name), hyphenated(name)):
            if spelling not in out:
                out.append(spelling)
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option says its default (or that it is required).

    Help text that already names its default (contains "default") is left alone.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or not action.option_strings or "default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:
            shown = "on" if action.default else "off"
        elif action.default is None:
            shown = "none"
        elif isinstance(action.default, (list, tuple)):
            shown = " ".join(str(v) for v in action.default)
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        default = self._get_default_metavar_for_optional(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, default)}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse parser of an ``e2e-wsi`` verb: both spellings of every long option, defaults in help.

    Write options in either spelling; before parsing or printing help, each long option is registered
    under its canonical (underscore) name first, plus the hyphen spelling and the shared aliases of
    :data:`SHARED_ALIASES`. Sub-command parsers (``cache info``) are of this class too.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        add_spellings(self)
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        add_spellings(self)
        return super().format_help()

    def format_usage(self) -> str:
        add_spellings(self)
        return super().format_usage()


def add_spellings(parser: argparse.ArgumentParser) -> None:
    """Register every long option of ``parser`` under all of :func:`spellings` (idempotent)."""
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or "--help" in longs:
            continue
        wanted: list[str] = []
        for option in longs:
            wanted += [s for s in spellings(option) if s not in wanted]
        shorts = [s for s in action.option_strings if not s.startswith("--")]
        for name in wanted:
            owner = parser._option_string_actions.get(name)
            if owner is not None and owner is not action:
                raise ValueError(f"{parser.prog}: option {name} is defined twice")  # a bug, not bad input
            parser._option_string_actions[name] = action
        action.option_strings = [*shorts, *wanted]


def option_names(parser: argparse.ArgumentParser) -> Iterable[argparse.Action]:
    """The optional actions of ``parser`` (help excluded), after :func:`add_spellings`."""
    add_spellings(parser)
    return [a for a in parser._actions if a.option_strings and "--help" not in a.option_strings]


def canonical_argv(argv: Sequence[str]) -> list[str]:
    """jsonargparse arguments with hyphenated option names rewritten to the canonical underscore form.

    ``--trainer.max-epochs 3`` -> ``--trainer.max_epochs 3``, ``--run-dir=x`` -> ``--run_dir=x``; values
    and everything after a bare ``--`` are left alone, as are the shared aliases (``--ckpt`` ->
    ``--ckpt_path``).
    """
    aliases = {alias: name for name, names in SHARED_ALIASES.items() for alias in names}
    out: list[str] = []
    rest = False
    for arg in argv:
        if rest or not arg.startswith("--") or arg == "--":
            rest = rest or arg == "--"
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        name = canonical(name)
        out.append(aliases.get(name, name) + eq + value)
    return out
