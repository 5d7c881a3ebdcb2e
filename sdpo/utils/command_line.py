"""The one command-line parser of every entry point: TRL's ``TrlParser`` over dataclasses, one-line errors.

A setting lives in one dataclass field (its ``help`` and reference-name ``aliases`` in ``metadata``); the flags,
the YAML ``--config`` keys and ``--help`` all come from it, and its checks run in ``__post_init__``. Problems are
one ``UsageError`` line (``parse`` turns argparse's, YAML's and ``__post_init__``'s into it); ``main`` functions
print it and exit 2.

Secrets never reach the terminal or a log through here: ``mask_secrets`` (the rules of ``scripts/common.sh``'s
``sdpo_mask_words``, plus URL credentials) rewrites every ``UsageError`` message and, once a parser has run,
every log record.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from trl import TrlParser

# A secret name ends in key, token, secret or password (any case, after leading dashes): ANTHROPIC_API_KEY,
# HF_TOKEN, --api_key, --hf-token; not MAX_NEW_TOKENS or --max_new_tokens. The same pattern as SDPO_SECRET_NAME
# in scripts/common.sh (tests/test_secrets.py holds the two to the same answers).
SECRET_NAME = re.compile(r"^-*([a-z0-9]+[_-])*(api_?key|key|token|secret|password)$", re.IGNORECASE)
MASK = "****"
# Values of secret-named variables are masked wherever they appear only from this length on (real keys are
# longer), so HF_TOKEN=1234 leaves `--seed 1234` alone.
MIN_SECRET_CHARS = 8
# scheme://user:password@host (the password is the secret) or scheme://token@host (the token is).
URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:]+:)?[^\s/@]+@")
_remembered_secrets: set[str] = set()


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.match(name))


def known_secrets() -> list[str]:
    """Values to mask wherever they appear: secret-named environment variables and the secret flags' values
    seen by a parser (``remember_secrets``), longest first, each at least ``MIN_SECRET_CHARS`` long."""
    values = {value for name, value in os.environ.items() if is_secret_name(name)} | _remembered_secrets
    return sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def mask_words(words: list[str]) -> list[str]:
    """``words`` (a command line) with secrets replaced by ``MASK``: the word after a secret flag, the value of
    ``--secret_flag=...`` and ``SECRET_NAME=...`` words, known secret values anywhere, a URL's password (or its
    token, when the URL has no user name)."""
    secrets = known_secrets()
    masked, after_flag = [], False
    for word in words:
        name = word.split("=", 1)[0].lstrip("([{'\"")
        if after_flag:
            word = MASK
        elif "=" in word and is_secret_name(name):
            word = word[: word.index("=") + 1] + MASK
        else:
            for secret in secrets:
                word = word.replace(secret, MASK)
            word = URL_CREDENTIALS.sub(rf"\g<scheme>\g<user>{MASK}@", word)
        bare = word.strip("'\"([{,;)]}")
        after_flag = bare.startswith("-") and is_secret_name(bare)
        masked.append(word)
    return masked


def mask_secrets(text: str) -> str:
    """``text`` (a message, a log line) with the secrets of ``mask_words`` masked; whitespace is kept."""
    parts = re.split(r"(\s+)", text)
    words = mask_words(parts[::2])
    parts[::2] = words
    return "".join(parts)


def remember_secrets(argv: list[str]) -> None:
    """Note the secrets in ``argv`` (secret flags' values, URL credentials) so later messages and logs mask them
    wherever they appear."""
    for index, word in enumerate(argv):
        name, has_value, value = word.partition("=")
        if name.startswith("-") and is_secret_name(name):
            _remembered_secrets.add(value if has_value else argv[index + 1] if index + 1 < len(argv) else "")
        for match in re.finditer(r"://([^\s/@]+)@", word):
            user, has_password, password = match.group(1).partition(":")
            _remembered_secrets.add(password if has_password else user)
    _remembered_secrets.discard("")


class _MaskingRecordFactory:
    """A log-record factory that masks secrets in each record's final message."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it when the record is emitted
            return record
        masked = mask_secrets(message)
        if masked != message:  # records without secrets stay as they are (some formatters read their args)
            record.msg, record.args = masked, None
        return record


def mask_secrets_in_logs() -> None:
    """From now on every log record of this process has its secrets masked (idempotent)."""
    if not isinstance(logging.getLogRecordFactory(), _MaskingRecordFactory):
        logging.setLogRecordFactory(_MaskingRecordFactory(logging.getLogRecordFactory()))


class UsageError(ValueError):
    """A command-line or config-file problem; the message is one line, with its secrets masked."""

    def __init__(self, message: str):
        super().__init__(mask_secrets(str(message)))


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
        action_of = {
            option.lstrip("-"): action
            for action in self._actions
            if not isinstance(action, argparse._StoreFalseAction)
            for option in action.option_strings
        }
        # Checked here, before the dataclasses are built: their __post_init__ would report a symptom instead.
        unknown = [key for key in config if key not in action_of]
        if unknown:
            raise UsageError(
                f"--config {self.config_file}: unknown key(s) {', '.join(unknown)}: use the option names of --help"
            )
        defaults = {}
        for key, value in config.items():
            action = action_of[key]
            many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
            if many and isinstance(value, (str, int, float, bool)):
                value = [value]  # one value for a list setting, as on the command line (report_to: none)
            self._check_config_shape(action, key, value)
            defaults[action.dest] = self._typed_config_value(action, key, value)
        return super().set_defaults_with_config(**defaults)

    def _check_config_shape(self, action: argparse.Action, key: str, value) -> None:
        """A list where the flag takes several values, and a value among the flag's choices (argparse checks
        neither for defaults, which is what YAML values become)."""
        if value is None:
            return
        many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
        if many and not isinstance(value, list):
            raise UsageError(f"--config {self.config_file}: {key} must be a list, got {value!r}")
        if action.choices is not None and action.type in (None, str):
            for item in value if isinstance(value, list) else [value]:
                if item not in action.choices:
                    choices = ", ".join(map(str, action.choices))
                    raise UsageError(f"--config {self.config_file}: {key} {item!r} is not one of {choices}")

    def _typed_config_value(self, action: argparse.Action, key: str, value):
        """A YAML value as the flag's type would read it: YAML's 1e-5 (a string) becomes a float, while 2.5 for
        a whole-number setting is refused instead of reaching the run."""
        if value is None or action.type not in (int, float):
            return value
        if isinstance(value, list) and action.nargs not in (None, "?"):
            return [self._typed_config_value(action, key, item) for item in value]
        whole = action.type is int
        ok = isinstance(value, int) if whole else isinstance(value, (int, float))
        if isinstance(value, str):
            try:
                return action.type(value)
            except ValueError:
                ok = False
        if not ok or isinstance(value, bool):
            wanted = "a whole number" if whole else "a number"
            raise UsageError(f"--config {self.config_file}: {key} must be {wanted}, got {value!r}")
        return action.type(value)

    def parse(self, argv: list[str] | None = None) -> tuple:
        """The dataclasses from ``argv`` (and ``--config FILE``); any problem is one ``UsageError``."""
        argv = list(sys.argv[1:] if argv is None else argv)
        remember_secrets(argv)
        mask_secrets_in_logs()
        config_file = None
        if "--config" in argv:
            index = argv.index("--config")
            if index == len(argv) - 1 or argv[index + 1].startswith("--"):
                raise UsageError("--config needs a YAML file: --config run.yaml")
            config_file = argv[index + 1]
            if Path(config_file).is_dir():
                raise UsageError(f"--config {config_file}: is a folder; pass a YAML file")
        self.config_file = config_file
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
    remember_secrets(list(sys.argv[1:] if argv is None else argv))
    mask_secrets_in_logs()
    try:
        return entry(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def without_credentials(url: str | None) -> str | None:
    """``url`` (or comma-separated URLs) without a user name or password (what results and state files may hold)."""
    if not url:
        return url
    if "," in url:
        return ",".join(without_credentials(part) for part in url.split(","))
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def stored_value(name: str, value):
    """What a results or state file may hold of a setting: never a secret-named one, URLs without credentials."""
    if is_secret_name(name) and value:
        return MASK
    if isinstance(value, str) and "://" in value:
        return without_credentials(value)
    return value


def settings_record(*configs) -> dict:
    """Every setting of the parsed dataclasses by field name (what results meta and state files record), each as
    ``stored_value`` keeps it."""
    settings = {key: value for config in configs for key, value in dataclasses.asdict(config).items()}
    return {name: stored_value(name, value) for name, value in settings.items()}
