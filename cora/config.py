"""Small, strict config layer over plain dataclasses (stdlib + PyYAML only).

``from_dict`` checks a nested mapping against a dataclass tree and reports
*every* problem (unknown keys with suggestions, wrong types, missing fields,
failed ``validate()`` checks) in a single :class:`ConfigError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "parse_overrides", "merge", "load"]

_NUMERIC_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` holds each message."""

    def __init__(self, problems: Iterable[str], source: str = "<dict>"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        header = f"{n} problem{'s' if n != 1 else ''} in config {source!r}:"
        super().__init__("\n".join([header] + [f"  - {p}" for p in self.problems]))


# ---------------------------------------------------------------- type checks

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, path: str, problems: list[str], checks: list[str]) -> Any:
    """Check ``value`` against ``tp``; append type problems to ``problems`` and
    failed ``validate()`` results to ``checks``; return the converted value."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            trial: list[str] = []
            trial_checks: list[str] = []
            out = _check(value, arm, path, trial, trial_checks)
            if not trial:
                checks.extend(trial_checks)
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return value

    if origin is Literal:
        # `True == 1`, so compare type as well as value.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        allowed = ", ".join(repr(a) for a in args)
        problems.append(f"{path}: {value!r} is not one of the allowed values: {allowed}")
        return value

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
            return value
        return _build(tp, value, path, problems, checks)

    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
            return value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                problems.append(f"{path}: expected {len(args)} items for {_type_name(tp)}, got {len(value)}")
                return list(value)
            return [_check(v, a, f"{path}[{i}]", problems, checks)
                    for i, (v, a) in enumerate(zip(value, args))]
        item_tp = args[0] if args else Any
        return [_check(v, item_tp, f"{path}[{i}]", problems, checks) for i, v in enumerate(value)]

    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
            return value
        if args:
            kt, vt = args
            return {_check(k, kt, f"{path}.<key>", problems, checks):
                    _check(v, vt, f"{path}.{k}", problems, checks)
                    for k, v in value.items()}
        return dict(value)

    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # unsupported annotation: accept as-is rather than guess
        return value
    problems.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _build(cls: type, data: dict, prefix: str, problems: list[str], checks: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dot = f"{prefix}." if prefix else ""
    unknown: list[str] = []  # reported, but do not block building/validate()
    for key in data:
        if key not in fields:
            msg = f"unknown key '{dot}{key}'"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
            msg += f" (valid keys: {', '.join(sorted(fields))})"
            unknown.append(msg)
    problems.extend(unknown)
    n_before = len(problems)

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check(data[name], hints.get(name, Any), f"{dot}{name}", problems, checks)
        elif not _has_default(f):
            problems.append(f"missing required key '{dot}{name}' ({_type_name(hints.get(name, Any))})")

    if len(problems) != n_before:  # type problems: skip construction/validate
        return None
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        where = prefix or cls.__name__
        checks.extend(f"{where}: {p}" for p in (validate() or []))
    return obj


# ---------------------------------------------------------------- public API

def from_dict(cls: type, data: dict, *, source: str = "<dict>") -> Any:
    """Build dataclass ``cls`` from ``data``, raising one ConfigError with all problems."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    problems: list[str] = []
    checks: list[str] = []
    obj = _build(cls, data, "", problems, checks)
    if problems or checks:
        raise ConfigError(problems + checks, source)
    return obj


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain nested dict (tuples become lists, so it round-trips via YAML)."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(dataclasses.asdict(obj))


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMERIC_RE.match(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-3" as a string
    if isinstance(value, list):
        return [float(v) if isinstance(v, str) and _NUMERIC_RE.match(v.strip()) else v for v in value]
    return value


def parse_overrides(items: Iterable[str]) -> dict:
    """``["a.b=3", "c=[x,y]"]`` -> ``{"a": {"b": 3}, "c": ["x", "y"]}``."""
    out: dict = {}
    problems: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            problems.append(f"bad override {item!r}: expected the form key=value (e.g. model.rank=8)")
            continue
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = _parse_value(raw)
    if problems:
        raise ConfigError(problems, "<overrides>")
    return out


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` into a copy of ``base``; neither input is modified."""
    out = {k: (merge(v, {}) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = merge(v, {}) if isinstance(v, dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file, with clear errors for a missing file, bad YAML or a non-mapping."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {source}"], source) from None
    except OSError as e:
        raise ConfigError([f"cannot read config file: {e}"], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"invalid YAML{where}: {problem}"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source)
    return data


def load(cls: type, path: str | Path | list, overrides: Iterable[str] = ()) -> Any:
    """Read YAML at ``path`` (or several files, later ones layered over earlier ones), apply
    ``key=value`` overrides, and build ``cls``."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    data: dict = {}
    for p in paths:
        data = merge(data, read_yaml(p))
    return from_dict(cls, merge(data, parse_overrides(overrides)), source=" + ".join(map(str, paths)))
