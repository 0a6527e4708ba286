"""Generic YAML <-> frozen-dataclass plumbing shared by every config: typed conversion with
field-named errors, plain-dict export, dotted `key=value` overrides and YAML file reading.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lwm_jax.errors import UserError


def check(cond: bool, msg: str) -> None:
    """Raises `UserError(msg)` unless `cond` (the validation helper of every config)."""
    if not cond:
        raise UserError(msg)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_convert(elem, v, f"{where}[{i}]") for i, v in enumerate(items))
    if origin is list:
        check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        (elem,) = typing.get_args(tp)
        return [_convert(elem, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e6` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where}={value!r} must be a number")
        return float(value)
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{where}={value!r} must be an integer")
        return value
    if tp is bool:
        check(isinstance(value, bool), f"{where}={value!r} must be true or false")
        return value
    if tp is str:
        check(isinstance(value, (str, int, float)), f"{where}={value!r} must be a string")
        return str(value)
    return value


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Builds dataclass `cls` from a plain dict, checking names and types; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    check(not unknown, f"unknown config key(s) {', '.join(prefix + k for k in unknown)} "
                        f"(valid: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    """Plain-data dict of a config dataclass (tuples become lists), fit for YAML or JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(obj))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with dotted `key=value` overrides applied (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        check(sep == "=" and key, f"bad override {item!r}: expected key=value, e.g. model.remat=none")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise UserError(f"bad override {item!r}: the value is not valid YAML "
                            f"({str(err).splitlines()[0]}); quote it, e.g. {key}='\"...\"'") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            check(isinstance(node, dict), f"bad override {item!r}: {part} is not a mapping")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with a clear error for a missing file or bad syntax."""
    path = Path(path)
    check(path.is_file(), f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}".splitlines()[0]) from None
    check(isinstance(data, dict), f"{path} must hold a YAML mapping at the top level")
    return data


