"""Typed configuration, one place.

A config is a dataclass whose fields carry `help` (and optionally `check`) metadata. Each field `foo_bar`
is settable by the flag `--foo-bar` and the environment variable `KVRELAY_FOO_BAR`; precedence is
flag > environment > default. Field names are unique across every config class a command composes,
so a flag always names exactly one setting. Invalid values raise `ConfigError` naming the flag; the CLI
turns that into a one-line message and exit status 2.

A config may be composed of groups: a dataclass inheriting from several dataclasses has all their fields
(flat: `cfg.foo_bar`, one flag each), and `--help` lists each base's fields under its own heading
(`group_title`, or the class name).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a config class is a dataclass

ENV_PREFIX = "KVRELAY_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the flag (and env var if that was the source)."""


def setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare a config field. `check(value)` returns an error message, or None when the value is valid."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _base_type(tp: Any) -> tuple[type, tuple[str, ...] | None]:
    """(python type, allowed choices) for a field annotation."""
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), tuple(str(c) for c in choices)
    return tp, None


def _convert(raw: str, tp: type, source: str) -> Any:
    if tp is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{source}: expected a boolean (true/false), got {raw!r}")
    try:
        return tp(raw)
    except ValueError:
        size = _size(raw) if tp is int else None
        if size is not None:
            return size
        raise ConfigError(f"{source}: expected {tp.__name__}, got {raw!r}") from None


_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _size(raw: str) -> int | None:
    """Byte sizes for integer settings: 512MiB, 4GiB, 64k, 2G (binary units: 1K = 1024)."""
    text = raw.strip().lower().removesuffix("b").removesuffix("i")
    if text[-1:] in _UNITS and text[:-1].strip().isdigit():
        return int(text[:-1]) * _UNITS[text[-1]]
    return None


def config_groups(cls: type) -> list[tuple[type, list[dataclasses.Field]]]:
    """(declaring class, its fields) for each group of `cls`: its dataclass bases in declaration order,
    then the fields `cls` declares itself (if any); a plain config is one group."""
    bases = [b for b in cls.__bases__ if dataclasses.is_dataclass(b)]
    own = cls.__dict__.get("__annotations__", {})
    groups: list[tuple[type, list[dataclasses.Field]]] = []
    for base in bases:
        groups += config_groups(base)
    fields = [f for f in dataclasses.fields(cls) if f.name in own]
    if fields or not groups:
        groups.append((cls, fields))
    return groups


def add_arguments(parser: argparse.ArgumentParser, *classes: type) -> None:
    """Add one flag per field of each config class, one help group per config group. Defaults stay
    unset so env vars can apply."""
    for composed in classes:
        for cls, fields in config_groups(composed):
            _add_group(parser, cls, fields)


def _add_group(parser: argparse.ArgumentParser, cls: type, fields: list[dataclasses.Field]) -> None:
    group = parser.add_argument_group(getattr(cls, "group_title", cls.__name__))
    hints = typing.get_type_hints(cls)
    for f in fields:
        tp, choices = _base_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (env {env_name(f.name)}; default {f.default!r})"
        if tp is bool:
            group.add_argument(
                flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                default=None, help=help_text,
            )
        else:
            group.add_argument(
                flag_name(f.name), dest=f.name, default=None, choices=choices,
                help=help_text, metavar=None if choices else f.name.split("_")[-1].upper(),
            )


def build(cls: type[C], args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
          **overrides: Any) -> C:
    """Build a config from flags, then env, then defaults; validate every field."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp, choices = _base_type(hints[f.name])
        flag = flag_name(f.name)
        raw = getattr(args, f.name, None) if args is not None else None
        source = flag
        if f.name in overrides:
            value = overrides[f.name]
        elif raw is not None:
            value = raw if isinstance(raw, bool) else _convert(str(raw), tp, flag)
        elif env_name(f.name) in env:
            source = f"{flag} (from {env_name(f.name)})"
            value = _convert(env[env_name(f.name)], tp, source)
        else:
            value = f.default
        if choices is not None and str(value) not in choices:
            raise ConfigError(f"{source}: invalid choice {value!r} (choose from {', '.join(choices)})")
        check = f.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise ConfigError(f"{source}: {problem}, got {value!r}")
        values[f.name] = value
    return cls(**values)
