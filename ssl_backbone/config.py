"""The one strict reader (and writer) of typed dataclass configs, for every config in the project.

Invariant: ``from_dict(cls, to_dict(cfg), what=...) == cfg`` for any config ``cfg``, and a dict
that does not describe a ``cls`` raises :class:`~ssl_backbone.errors.ConfigError` naming the
offending field (dotted for nested configs), never a ``TypeError`` from the constructor.

Why it holds: the reader walks ``dataclasses.fields(cls)`` with their resolved type hints, so the
keys it accepts are exactly the constructor's arguments; JSON has no tuples, so ``to_dict`` turns
tuples into lists and the reader turns lists back into tuples wherever the field is a tuple; a
nested dataclass field is read by the same function, recursively. Numbers written as integers
are read as floats where the field is a float (a hand-written ``"gsd": 1``), so the config
writes back the same JSON as one built in Python. A field called ``format_version`` marks a
versioned file format: its default is the version this code writes, and a larger number in the
file means a newer writer whose meaning this code cannot know, so it is refused rather than
half-read; an older one is read and the result carries the current version.

A field declared with :func:`added_field` (one added after files of its config were first
written) is left out of ``to_dict`` while it holds its default: a file that does not use the
feature stays readable by a release that predates the field (whose reader refuses unknown
keys), and the invariant above still holds because a missing key reads as the default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ssl_backbone.errors import ConfigError

T = TypeVar("T")

FORMAT_FIELD = "format_version"
_ADDED = "canopy_added_field"  # field metadata key of added_field


def added_field(default: Any) -> Any:
    """A dataclass field with ``default`` that :func:`to_dict` omits while it holds it."""
    return dataclasses.field(default=default, metadata={_ADDED: True})


def to_dict(cfg: Any) -> dict:
    """Plain JSON-ready dict of a dataclass config: nested configs as dicts, tuples as lists."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if not (f.metadata.get(_ADDED) and getattr(cfg, f.name) == f.default)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], d: Any, *, what: str, field: str = "") -> T:
    """Build ``cls`` from ``d``, refusing unknown keys, wrong types and newer format versions.

    ``what`` names the config in messages ("model config" → "unknown model config keys: [...]");
    a nested dataclass field ``decoder`` is read as "decoder config". ``field`` is the dotted
    path of ``d`` inside an enclosing config (empty at the top). Keys missing from ``d`` take
    the dataclass defaults.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{what}: expected a mapping of keys to values, got {type(d).__name__}",
                          field=field or None)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise ConfigError(f"unknown {what} keys: {unknown}", field=_join(field, unknown[0]))
    hints = typing.get_type_hints(cls)
    if FORMAT_FIELD in known:
        _check_format(known[FORMAT_FIELD], d.get(FORMAT_FIELD), what, _join(field, FORMAT_FIELD))
    # an older format_version is read, then dropped: the config in memory is the current
    # format (fields the file predates hold their defaults), and says so when written again
    kwargs = {name: _read(value, hints.get(name, Any), _join(field, name), name)
              for name, value in d.items() if name != FORMAT_FIELD}
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_format(f: dataclasses.Field, value: Any, what: str, path: str) -> None:
    current = f.default
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what}: {FORMAT_FIELD} must be an integer, got {value!r}", field=path)
    if value > current:
        raise ConfigError(f"{what} format {value} is newer than this version understands "
                          f"({current}); upgrade this software to read it", field=path)


def _read(value: Any, hint: Any, path: str, name: str) -> Any:
    """``value`` as the type ``hint`` says, or a ConfigError naming ``path``."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, what=f"{name} config", field=path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: a value is required, got null", field=path)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _read(value, options[0], path, name)
        return value  # a union of several types: the constructor decides
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}", field=path)
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_read(v, args[0], f"{path}[{i}]", name) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}", field=path)
        return tuple(_read(v, a, f"{path}[{i}]", name) for i, (v, a) in enumerate(zip(value, args))) \
            if args else tuple(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}", field=path)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}", field=path)
        return value
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise ConfigError(f"{path}: expected {'true or false' if hint is bool else 'a string'}, "
                              f"got {value!r}", field=path)
        return value
    return value
