"""The one command-line parser of every entry point: TRL's ``TrlParser`` over dataclasses, one-line errors.

A setting lives in one dataclass field (its ``help`` and reference-name ``aliases`` in ``metadata``); the flags,
the YAML ``--config`` keys and ``--help`` all come from it, and its checks run in ``__post_init__``. Problems are
one ``UsageError`` line (``parse`` turns argparse's, YAML's and ``__post_init__``'s into it); ``main`` functions
print it and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import yaml
from trl import TrlParser


class UsageError(ValueError):
    """A command-line or config-file problem; the message is one line."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends each flag's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and not any(action.default is unset for unset in (None, False, argparse.SUPPRESS)):
            if "%(default)" not in text:
                text += " (default: %(default)s)"
        return text


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ConfigValueError(UsageError):
    """A YAML value of the wrong type or outside a field's choices (argparse converts only command-line strings)."""


def _check_config_value(key: str, value, action: argparse.Action) -> None:
    """Raise ``ConfigValueError`` unless the YAML ``value`` is what ``action`` would have parsed from the flag."""
    if value is None:
        return  # None keeps a field unset
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
    if many and not isinstance(value, list):
        raise ConfigValueError(f"{key}: expected a list, got {value!r}")
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and action.type not in (None, str):
            continue  # argparse parses a string default like a command-line value, with the same one-line errors
        if action.type is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise ConfigValueError(f"{key}: expected a whole number, got {item!r}")
        if action.type is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise ConfigValueError(f"{key}: expected a number, got {item!r}")
        if action.choices is not None and item not in action.choices:
            raise ConfigValueError(f"{key}: {item!r} is not one of {', '.join(map(str, action.choices))}")


class ConfigParser(TrlParser):
    """``TrlParser`` whose errors raise ``UsageError`` and whose YAML files may use a flag's aliases as keys.

    Without dataclasses it is a plain ``argparse`` parser with the same one-line errors.
    """

    def __init__(self, dataclass_types=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        # A list field whose default is a list may also be given empty (``--eval_styles`` with no style).
        for action in self._actions:
            if action.nargs == "+" and isinstance(action.default, list):
                action.nargs = "*"

    def error(self, message: str):
        # HfArgumentParser also accepts --a-b for --a_b; name only the documented spelling.
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)
        raise UsageError(f"{message} (see --help)")

    def set_defaults_with_config(self, **config) -> list[str]:
        actions = {
            option.lstrip("-"): action
            for action in self._actions
            if not isinstance(action, argparse._StoreFalseAction)
            for option in action.option_strings
        }
        # Checked here, before the dataclasses are built: their __post_init__ would report a symptom instead.
        unknown = [key for key in config if key not in actions]
        if unknown:
            raise ConfigValueError(f"unknown key(s) {', '.join(unknown)}: use the option names of --help")
        for key, value in config.items():
            _check_config_value(key, value, actions[key])
        return super().set_defaults_with_config(**{actions[key].dest: value for key, value in config.items()})

    def parse(self, argv: list[str] | None = None) -> tuple:
        """The dataclasses from ``argv`` (and ``--config FILE``); any problem is one ``UsageError``."""
        argv = list(sys.argv[1:] if argv is None else argv)
        config_file = None
        if "--config" in argv:
            index = argv.index("--config")
            if index == len(argv) - 1 or argv[index + 1].startswith("--"):
                raise UsageError("--config needs a YAML file: --config run.yaml")
            config_file = argv[index + 1]
            if Path(config_file).is_dir():
                raise UsageError(f"--config {config_file}: is a folder; pass a YAML file")
        where = f"--config {config_file}: " if config_file else ""
        try:
            *parsed, _, unknown_flags = self.parse_args_and_config(
                argv, return_remaining_strings=True, separate_remaining_strings=True
            )
        except FileNotFoundError:
            raise UsageError(f"{where}no such file") from None
        except UnicodeDecodeError:
            raise UsageError(f"{where}not a UTF-8 text file") from None
        except yaml.YAMLError as error:
            raise UsageError(f"{where}not valid YAML ({first_line(error)})") from None
        except ConfigValueError as error:
            raise UsageError(f"{where}{error}") from None
        except UsageError:
            raise
        except (ValueError, TypeError) as error:
            raise UsageError(f"{where if 'config' in str(error).lower() else ''}{first_line(error)}") from None
        if unknown_flags:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown_flags)} (see --help)")
        return tuple(parsed)


def flag_help(dataclass_type) -> dict[str, str]:
    """Field name → help text of a dataclass (what ``--help`` prints for it)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(dataclass_type)}


def run_main(entry, argv=None) -> int:
    """Call ``entry(argv)``; a ``UsageError`` becomes ``error: <line>`` on stderr and exit status 2."""
    try:
        return entry(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
