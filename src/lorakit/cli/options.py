"""Command-line plumbing shared by the `lorakit` subcommands: option types, --config files, output paths."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from lorakit.io_utils import nearest_existing


class CliError(Exception):
    """A usage problem: printed as `lorakit <cmd>: error: ...`, exit status 2."""


# -- option types ----------------------------------------------------------------------------------------

def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes where 0 makes no sense (batch sizes, token caps, limits)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type for intervals where 0 means 'never' (eval/save every N steps)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _float_in(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type for rates and scales where 0 makes no sense (learning rate, LoRA alpha)."""
    return _float_in(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """argparse type for amounts where 0 means 'none' (weight decay, gradient clipping)."""
    return _float_in(text, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    """argparse type for a share in [0, 1) (warmup ratio, dropout)."""
    return _float_in(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


TYPE_NAMES = {int: "an integer", float: "a number", positive_int: "a positive integer",
              non_negative_int: "an integer >= 0", positive_float: "a number > 0", non_negative_float: "a number >= 0",
              fraction: "a number in [0, 1)"}
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


# -- config files --------------------------------------------------------------------------------------

def load_config_file(path: str) -> dict[str, Any]:
    """The raw mapping of a YAML or JSON file; keys with '-' are spelled with '_'."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types; both mean "not parseable"
        raise CliError(f"config file {path} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"config file {path} must hold a mapping of option names to values")
    return {_config_key(str(k)): v for k, v in data.items()}


def _config_key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def config_keys(add_options: Callable[[argparse.ArgumentParser], None]) -> dict[str, argparse.Action]:
    """Config-file keys -> the option each sets: its field name and the flag spellings of --help (lora-r, no-base)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    actions = [a for a in parser._actions if a.dest != "config"]  # argparse has no public list of its options
    keys = {action.dest: action for action in actions}
    for action in actions:
        for flag in action.option_strings:
            keys.setdefault(_config_key(flag), action)
    return keys


def read_config_options(path: str, add_options: Callable[[argparse.ArgumentParser], None]) -> dict[str, Any]:
    """Options from a --config file, keyed and typed as the matching flags would give them."""
    keys = config_keys(add_options)
    values = load_config_file(path)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        fields = sorted({action.dest for action in keys.values()})
        raise CliError(f"config file {path}: unknown option(s) {', '.join(unknown)}; valid options: "
                       f"{', '.join(fields)} (or the flag names of --help, e.g. lora-r, no-progress)")
    options: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for key, value in values.items():
        action = keys[key]
        if action.dest in set_by:
            raise CliError(f"config file {path}: {set_by[action.dest]} and {key} set the same option; keep one")
        set_by[action.dest] = key
        options[action.dest] = config_value(path, key, value, action)
    return options


def config_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """A config-file value checked and converted as its option's flag would be (YAML reads 1e-3 as a string)."""
    def wrong(expected: str) -> CliError:
        return CliError(f"config file {path}: {key}: expected {expected}, got {value!r}")

    if value is None:
        raise CliError(f"config file {path}: {key} has no value; give one or delete the line")
    if action.nargs == 0:  # a switch such as --bf16 or --no-progress
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            value = value.lower() in TRUE_WORDS
        if not isinstance(value, bool):
            raise wrong("true or false")
        # 'no_progress: true' means progress false; 'progress: true' means what it says
        return value if key == action.dest or action.const else not value
    if action.type is comma_list:
        if isinstance(value, str):
            return comma_list(value)
        if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
            return [v.strip() for v in value]
        raise wrong("a list of names or a comma-separated string")
    if action.type is None:
        if not isinstance(value, str):
            raise wrong("a string")
        if action.choices and value not in action.choices:
            raise wrong(f"one of {', '.join(action.choices)}")
        return value
    expected = TYPE_NAMES.get(action.type, action.type.__name__)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise wrong(expected)
    try:
        return action.type(str(value))
    except (ValueError, argparse.ArgumentTypeError):
        raise wrong(expected) from None


def merge_options(defaults: dict[str, Any], file_values: dict[str, Any], flags: argparse.Namespace,
                  valid: Sequence[str]) -> dict[str, Any]:
    """defaults < config file < command-line flags (only flags actually given are in `flags`)."""
    merged = dict(defaults)
    merged.update(file_values)
    merged.update({k: v for k, v in vars(flags).items() if k in valid})
    return merged


# -- output paths ------------------------------------------------------------------------------------------

def check_output_file(path: str, flag: str) -> None:
    """Fail before minutes of work when a result file could not be written there."""
    target = Path(path)
    if target.is_dir():
        raise CliError(f"{flag} {path} is a directory; give a file name, e.g. {target / 'eval.json'}")
    existing = nearest_existing(target.parent)
    if not existing.is_dir():
        raise CliError(f"{flag} {path}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: {existing} is not writable by this user; choose another path "
                       "or fix its permissions")
