"""``metroline serve --config FILE.yaml``, as vLLM reads its ``--config``: the file maps flag
names (``max-model-len`` or ``max_model_len``, no leading dashes) to values, and stands for
those flags written before the command line's own, so that a flag given on the command line
wins. ``model:`` gives the model when the command line does not.

Values: a scalar is the flag's value, ``true`` sets a switch (``false`` the ``--no-`` form of
an on/off flag, or leaves a plain switch unset), a list gives a many-valued flag its values,
``null`` leaves the flag at its default. A key that names no flag, a value of the wrong shape,
a file that is not a YAML mapping or larger than :data:`MAX_CONFIG_BYTES` is an error naming
it (the command exits with status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 2**20


class ConfigFileError(ValueError):
    """The file cannot stand for flags; the message names the file and the key."""


def config_file_args(path: str, parser: argparse.ArgumentParser) -> tuple[str | None, list[str]]:
    """The file's model (None when it gives none) and the flags it stands for, as command
    line arguments of ``parser``."""
    entries = _load(path)
    actions = {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    model = None
    args: list[str] = []
    for key, value in entries.items():
        if not isinstance(key, str) or not key:
            raise ConfigFileError(f"--config {path}: the key {key!r} is not a flag name")
        if key == "model":
            if value is not None and not isinstance(value, str):
                raise ConfigFileError(f"--config {path}: model must be a string")
            model = value
            continue
        flag = "--" + key.replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            raise ConfigFileError(
                f"--config {path}: {key!r} is not a flag of metroline serve (see --help)"
            )
        args += _as_args(path, key, flag, action, value)
    return model, args


def _load(path: str) -> dict[Any, Any]:
    import yaml

    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigFileError(f"--config {path}: {size} bytes, more than {MAX_CONFIG_BYTES}")
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"--config {path}: cannot read it ({error})") from None
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigFileError(f"--config {path}: not valid YAML ({error})") from None
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise ConfigFileError(f"--config {path}: must be a mapping of flag names to values")
    return entries


def _as_args(path: str, key: str, flag: str, action: argparse.Action, value: Any) -> list[str]:
    if value is None:
        return []
    switch = isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction))
    if switch:
        if not isinstance(value, bool):
            raise ConfigFileError(f"--config {path}: {key} takes true or false; got {value!r}")
        if value:
            return [flag]
        return [f"--no-{flag[2:]}"] if isinstance(action, argparse.BooleanOptionalAction) else []
    if isinstance(value, (dict, bool)):
        raise ConfigFileError(f"--config {path}: {key} takes a value, not {value!r}")
    if isinstance(value, list):
        if action.nargs != "+" or not value:
            raise ConfigFileError(f"--config {path}: {key} takes one value, not a list")
        return [flag, *(_scalar(path, key, item) for item in value)]
    return [flag, _scalar(path, key, value)]


def _scalar(path: str, key: str, value: Any) -> str:
    if isinstance(value, (dict, list, bool)) or value is None:
        raise ConfigFileError(f"--config {path}: {key} has the value {value!r}, not a scalar")
    return str(value)


def expand_config(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` (after the sub-command) with ``--config FILE`` expanded in front of the
    command line's own flags (its model first, when the command line gives none)."""
    argv = list(argv)
    path = None
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            path = argv[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return argv
    model, args = config_file_args(path, parser)
    has_model = bool(argv) and not argv[0].startswith("-")
    if has_model:
        return [argv[0], *args, *argv[1:]]
    return [*([model] if model else []), *args, *argv]
