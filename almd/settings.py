"""The one settings base: pydantic dataclasses read from TOML tables, every value checked.

Every settings class, and every saved state read back, is a :func:`settings` class: a pydantic v2
dataclass whose values are checked against their type hints as TOML spells them (an integer is a
number, but ``true`` is neither a number nor an integer, and ``"5"`` is not 5) and whose unknown
keys are refused. A failure is one line, a :class:`ConfigError` that names the key, the value and
what is allowed — before anything is loaded or run. They stay dataclasses: ``dataclasses.replace``
(checked again), ``asdict`` and ``fields`` work as on any other.

:class:`TomlSettings` reads a file whose sections are such classes. Each class's own range and
cross-field checks (``__post_init__``, :meth:`TomlSettings.validate`) run once the types are right.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BeforeValidator, ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import ArgsKwargs

__all__ = ["SETTINGS_CONFIG", "ConfigError", "OneOrMore", "TomlSettings", "bad", "read_section", "read_state", "settings"]

#: the pydantic config of every settings class: unknown keys refused, and values of the hinted
#: kind only (strict: no "5" for 5, no true for 1); an int given for a float becomes that float
SETTINGS_CONFIG = ConfigDict(extra="forbid", strict=True)

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is unknown or has a bad value."""


def bad(key: str, value: Any, allowed: str) -> ConfigError:
    """The error for a value that is not allowed, naming the key and what is."""
    return ConfigError(_not_allowed(key, value, allowed))


def _not_allowed(key: str, value: Any, allowed: str) -> str:
    return f"{key} = {value!r} is not allowed; {allowed}"


def _as_list(value: Any) -> Any:
    """TOML users write a list of one bare (``freeze = "embedding"``); a tuple is a list too."""
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, list) else [value]


#: a list whose single item may be given bare: ``supercell = 2`` is ``[2]``
OneOrMore = Annotated[list[T], BeforeValidator(_as_list)]


@dataclasses.dataclass(frozen=True)
class _Style:
    """How a settings class's errors read outside a TOML section (its Python constructor)."""

    error: type[Exception] = ConfigError  #: the exception raised for a bad or unknown value
    owner: str = ""  #: prefix of its keys: "TriggerSettings" → "TriggerSettings.window = ..."
    noun: str = "key"  #: what an unknown key is called: "unknown walker setting 'temp'"


def settings(cls: type | None = None, /, *, frozen: bool = False, error: type[Exception] = ConfigError,
             owner: str = "", noun: str = "key") -> Any:
    """Make ``cls`` a settings class: a pydantic dataclass (:data:`SETTINGS_CONFIG`) whose construction
    raises one line (its own ``__post_init__`` errors unchanged), never pydantic's multi-line report.

    Parameters
    ----------
    cls : the class, when used as a bare ``@settings``
    frozen : as for :func:`dataclasses.dataclass`
    error : the exception class of a bad or unknown value given to the constructor
    owner : the prefix of the keys named in those errors (default: none)
    noun : what an unknown key is called in them (default: "key")
    """
    def make(cls: type) -> type:
        cls = pydantic_dataclass(cls, config=SETTINGS_CONFIG, frozen=frozen)
        cls.__init__ = _checked_init
        cls._settings_style = _Style(error, owner, noun)
        return cls

    return make if cls is None else make(cls)


def _checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """The ``__init__`` of a settings class: pydantic fills and checks the fields, as its own does."""
    _validate(type(self), self, ArgsKwargs(args, kwargs), section="")


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays as Python numbers and lists (strict types refuse ``np.int64(3)``)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    return value


def _validate(cls: type, instance: Any, arguments: ArgsKwargs, section: str) -> None:
    arguments = ArgsKwargs(_plain(tuple(arguments.args)), _plain(dict(arguments.kwargs or {})))
    try:
        cls.__pydantic_validator__.validate_python(arguments, self_instance=instance)
    except ValidationError as exc:
        raise _one_line(exc, cls, section) from None


def read_section(name: str, cls: type, raw: Any) -> Any:
    """One TOML table → an instance of the settings class ``cls``; errors name ``name.key``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    instance = cls.__new__(cls)
    _validate(cls, instance, ArgsKwargs((), raw), section=name)
    return instance


#: pydantic's error types → what is allowed, as a TOML user reads it
_EXPECTED = {
    "float_type": "expected a number", "int_type": "expected an integer", "bool_type": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "tuple_type": "expected a list",
    "dict_type": "expected a table",
}


def _one_line(exc: ValidationError, cls: type, section: str) -> Exception:
    """Pydantic's error as the project's one line: the key (``section.key[i]``), the value, what is allowed.

    Outside a section (``section=""``) the error is the class's own kind, its keys under its ``owner``.
    """
    style: _Style = getattr(cls, "_settings_style", _Style())
    errors = exc.errors(include_url=False)
    # an unknown key first: a misspelt key is the likelier mistake, and explains a missing one
    first = min(errors, key=lambda e: e["type"] != "unexpected_keyword_argument")
    kind, loc = first["type"], first["loc"]
    if kind == "value_error" and not loc:  # the class's own check (__post_init__): its message, in the section
        own = first["ctx"]["error"]
        return ConfigError(f"[{section}]: {own}") if section else own
    error = ConfigError if section else style.error
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    if kind == "unexpected_keyword_argument" and section:
        return error(f"unknown key '{_dotted(section, loc)}'; allowed in [{section}]: {names}")
    if kind == "unexpected_keyword_argument":
        return error(f"unknown {style.noun} '{_dotted('', loc)}'; allowed: {names}")
    key = _dotted(section or style.owner, loc)
    if kind in ("missing", "missing_argument"):
        return error(f"missing key '{key}'")
    message = first["msg"]
    return error(_not_allowed(key, first["input"], _EXPECTED.get(kind, message[:1].lower() + message[1:])))


def _dotted(prefix: str, loc: tuple[str | int, ...]) -> str:
    """``("supercell", 1)`` under "system" → ``system.supercell[1]``."""
    key = prefix
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def read_state(cls: type, raw: Any, name: str, error: type[Exception] = ConfigError) -> Any:
    """A saved state (a JSON object) → the settings class ``cls``, every field checked.

    Keys of no field are left out (states written by other versions); a missing or corrupt
    field is a one-line ``error`` under ``name`` ("walker state: positions[0][1] = ...").
    """
    if not isinstance(raw, dict):
        raise error(f"{name} = {raw!r} is not allowed; expected a JSON object")
    try:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
    except error as exc:
        raise error(f"{name}: {exc}") from None


class TomlSettings:
    """TOML reading for a settings class whose fields are sections (settings classes themselves)
    or arrays of tables (``[[name]]``, lists of dicts).

    Subclasses add their cross-section checks in :meth:`validate`.
    """

    @classmethod
    def from_dict(cls, raw: dict[str, Any]):
        """Settings from a mapping of sections (a parsed TOML file): every value checked, then :meth:`validate`."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}]; allowed: {', '.join(names)}")
        sections = {name: read_section(name, hints[name], value) for name, value in raw.items()
                    if dataclasses.is_dataclass(hints[name])}
        settings = cls(**{**raw, **sections})  # the arrays of tables are checked as they are
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
