"""The configuration pattern shared by every stage.

A stage config is a dataclass whose fields are declared with :func:`option` (a default and a help
text) and whose ``__post_init__`` validates values with messages that name the fix. Configs load
from YAML files plus ``key=value`` overrides (dotted keys reach nested configs), and flatten to
``{"lora.r": "8", ...}`` for tracking.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from alignpipe.errors import ConfigError

C = TypeVar("C")

# Words that make a field name a credential; its value is never logged or printed.
SECRET_WORDS = frozenset({"password", "passwd", "secret", "credential", "credentials", "apikey"})
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key")})
# "token" ending a name is a secret (hf_token, auth.token) unless it names a vocabulary entry
# (pad_token); elsewhere it describes tokens (token_checks, eos_token_id).
VOCAB_TOKENS = frozenset({"pad", "bos", "eos", "unk", "sep", "cls", "mask", "special", "chat"})


def is_secret_key(key: str) -> bool:
    """Whether a dotted option or tag name holds a credential (whole words, not substrings)."""
    words = re.split(r"[._\-\s]+", key.lower())
    if SECRET_WORDS.intersection(words) or SECRET_PAIRS.intersection(itertools.pairwise(words)):
        return True
    return words[-1] == "token" and not VOCAB_TOKENS.intersection(words)


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """Declare a config field with a default and a help text.

    Mutable defaults (lists, dicts, nested configs) are given as a zero-argument factory through
    ``default_factory=``.
    """
    if not help:
        raise TypeError("every config option needs a help text")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def help_text(cls: type, name: str) -> str:
    """Return the help text declared for ``cls.name``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """List ``(name, type, default, help)`` for each field, nested configs flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            for name, typ, default, text in describe(hint):
                rows.append((f"{f.name}.{name}", typ, default, text))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, _type_name(hint), default, f.metadata.get("help", "")))
    return rows


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are YAML scalars (``8``, ``true``, ``[a, b]``)."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value; write it like lora.r=8")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return parsed


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: Iterable[str] | Mapping = ()
) -> C:
    """Build ``cls`` from an optional YAML file, then apply overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in extra.items():
        _set_dotted(values, key, value)
    return from_dict(cls, values)


def from_dict(cls: type[C], values: Mapping[str, Any], _prefix: str = "") -> C:
    """Build a config dataclass from plain values, coercing scalars to the declared types."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{_prefix or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f" in {_prefix.rstrip('.')}" if _prefix else ""
        valid = ", ".join(sorted(known))
        raise ConfigError(f"unknown option {_prefix}{unknown[0]}{where}; valid options: {valid}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{_prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Return the config as nested plain values (for YAML dumps and component arguments)."""
    return dataclasses.asdict(config)


def flatten(config: Any, redact: bool = True) -> dict[str, str]:
    """Flatten a config to ``{"dotted.key": "value"}`` strings, for tracking params.

    Fields whose names look like credentials are replaced by ``"***"`` so that a secret passed
    through a config can never reach MLflow params or logs.
    """
    flat: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{prefix}{f.name}.")
            return
        key = prefix.rstrip(".")
        if redact and is_secret_key(key) and value not in (None, ""):
            flat[key] = "***"
        else:
            flat[key] = "" if value is None else str(value)

    walk(config, "")
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a nested section")
    node[leaf] = value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Coerce a YAML/CLI value to the annotated type, or raise a ConfigError naming the option."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for arg in inner:
            try:
                return _coerce(arg, value, name)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, f"{name}.")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, name) for v in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}") from None
        if hint is int:
            # whole floats are fine (KFP and JSON send 64.0 for 64); 0.5 for a count is not
            if not number.is_integer():
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be text, got {value!r}")
        return str(value)
    return value
