"""The one settings base: TOML tables → typed dataclasses, every value checked.

An unknown section or key, or a value of the wrong kind, is a :class:`ConfigError`
that names the key, the value and what is allowed — before anything is loaded or run.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "TomlSettings", "bad", "read_section"]


class ConfigError(ValueError):
    """A setting is unknown or has a bad value."""


def bad(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for a value that is not allowed, naming the key and what is."""
    return ConfigError(f"{key} = {value!r} is not allowed; {allowed}")


class TomlSettings:
    """TOML reading for a dataclass whose fields are sections (dataclasses themselves).

    Subclasses add their cross-section checks in :meth:`validate`.
    """

    @classmethod
    def from_dict(cls, raw: dict[str, Any]):
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(raw) - set(hints))
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}]; allowed: {', '.join(hints)}")
        settings = cls(**{name: _tables(name, raw.get(name, [])) if typing.get_origin(hints[name]) is list
                          else _section(name, hints[name], raw.get(name, {})) for name in hints})
        settings.validate()
        return settings

    @classmethod
    def from_toml(cls, path: str | Path):
        with open(path, "rb") as fh:
            try:
                raw = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Checks that involve several settings (each value's type is checked on reading)."""


def _tables(name: str, raw: Any) -> list[dict[str, Any]]:
    """A TOML array of tables (``[[name]]``), each checked by the settings' own :meth:`validate`."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{name} = {raw!r}: expected an array of tables ([[{name}]] sections)")
    return [dict(t) for t in raw]


def read_section(name: str, cls: type, raw: Any) -> Any:
    """One TOML table → an instance of the dataclass ``cls`` (see :func:`_section`)."""
    return _section(name, cls, raw)


def _section(name: str, cls: type, raw: Any) -> Any:
    """One TOML table → an instance of the dataclass ``cls``, every value checked against its hint."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{name}.{key}'; allowed in [{name}]: {', '.join(hints)}")
        values[key] = _coerce(f"{name}.{key}", hints[key], value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # the settings class's own checks
        raise ConfigError(f"[{name}]: {exc}") from None


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # "X | None": TOML has no null, so X
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        if typing.get_origin(item) is list:  # a list of lists, e.g. [md] schedule
            if not isinstance(value, list):
                raise ConfigError(f"{key} = {value!r}: expected a list of lists")
            return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        if item is float:
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                     for v in (value if isinstance(value, list) else [value])]
        if isinstance(value, item):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of {item.__name__}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a table")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} = {value!r}: expected {getattr(hint, '__name__', hint)}")
