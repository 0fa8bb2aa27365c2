"""The machinery of typed configuration (dragonfly/config.py holds the schema itself).

A section is a dataclass whose fields are made with `opt` (default, one-line doc,
constraints); `Size`, `Rate` and `Duration` fields take units. `Loader` applies one
source's values (a TOML table, an environment variable, a --set) to a configuration,
validating each and recording which source set which key; a bad value is a
`ConfigError` naming the source, the key and what was expected. `render` writes a
configuration back as TOML, each key with its documentation or its source.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import itertools
import math
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any

from dragonfly.units import (
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)


class Unit:
    """Markers for Annotated fields whose values carry units."""

    SIZE = "size"
    RATE = "rate"
    DURATION = "duration"


Size = Annotated[int, Unit.SIZE]
Rate = Annotated[int, Unit.RATE]
Duration = Annotated[float, Unit.DURATION]


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type, or out of range."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


def opt(default: Any, doc: str, **constraints: Any) -> Any:
    """A config field: its default, a one-line doc, and constraints (min, max, choices, regex).

    A list or section default is deep-copied for every instance: a shallow copy
    would share its items (ProxyRule objects, nested lists) between configs.
    """
    meta = {"doc": doc, **constraints}
    if isinstance(default, list) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


_TYPE_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    if cls not in _TYPE_HINTS:
        _TYPE_HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return _TYPE_HINTS[cls]


def fields_of(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def describe(tp: Any) -> str:
    unit = unit_of(tp)
    if unit == Unit.SIZE:
        return "a size (bytes, or e.g. '4MiB')"
    if unit == Unit.RATE:
        return "a rate (bytes/s, or e.g. '20MB/s')"
    if unit == Unit.DURATION:
        return "a duration (seconds, or e.g. '30s', '5m')"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a table ({', '.join(fields_of(tp))})"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp)
    )


def unit_of(tp: Any) -> str | None:
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[1]
    return None


def brief(value: Any) -> str:
    """repr of a value for an error message, cut short: a 5000-digit value must not flood it."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond the interpreter's digit limit
        return "an integer too large to show"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_finite(value: int | float) -> None:
    """nan passes every min/max check and inf breaks int() and timeouts: refuse both."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"expected a finite number, got {brief(value)}")


def coerce(tp: Any, value: Any, meta: Mapping[str, Any], from_text: bool) -> Any:
    """Validate one value against its annotated type and constraints; raise ValueError."""
    unit = unit_of(tp)
    if unit is not None:
        base = typing.get_args(tp)[0]
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected {describe(tp)}, got {brief(value)}")
        if isinstance(value, str):
            parse = {Unit.SIZE: parse_size, Unit.RATE: parse_rate, Unit.DURATION: parse_duration}
            value = parse[unit](value)
        _check_finite(value)
        if base is int and value != int(value):
            raise ValueError(f"expected {describe(tp)}, got {brief(value)}")
        value = base(value)
    elif tp is bool:
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                value = True
            elif lowered in ("false", "0", "no", "off"):
                value = False
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {brief(value)}")
    elif tp is int:
        if from_text and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {brief(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {brief(value)}")
    elif tp is float:
        if from_text and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {brief(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {brief(value)}")
        _check_finite(value)
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {brief(value)}")
    elif typing.get_origin(tp) is list:
        raise AssertionError("lists are coerced by _coerce_list")
    else:
        raise AssertionError(f"unsupported config type {tp}")
    _check_constraints(value, meta)
    return value


def _check_constraints(value: Any, meta: Mapping[str, Any]) -> None:
    if "min" in meta and value < meta["min"]:
        raise ValueError(f"must be at least {meta['min']}, got {brief(value)}")
    if "max" in meta and value > meta["max"]:
        raise ValueError(f"must be at most {meta['max']}, got {brief(value)}")
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"expected one of {', '.join(meta['choices'])}, got {brief(value)}")
    if meta.get("regex"):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {brief(value)}: {exc}") from None
    if "item_regex" in meta and not re.search(meta["item_regex"], value):
        raise ValueError(f"{brief(value)} does not match {meta['item_regex']!r}")
    if meta.get("cidr"):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"expected an address or network (CIDR), got {brief(value)}") from None


def parse_text_value(text: str) -> Any:
    """A --set or environment value: a TOML value if it parses as one, else the raw text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer beyond int()'s digit limit
        return text


# Which source set each dotted key last, and when: (order of the source, its name).
Origins = dict[str, tuple[int, str]]
_LOADER_ORDER = itertools.count()


class Loader:
    """Applies one source's values; records in `origins` which keys it set."""

    def __init__(self, source: str, from_text: bool, origins: Origins) -> None:
        self.source = source
        self.from_text = from_text
        self.origins = origins
        self.order = next(_LOADER_ORDER)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def set(self, obj: Any, key: str, value: Any, path: str) -> None:
        setattr(obj, key, value)
        self.origins[path] = (self.order, self.source)

    def apply_table(self, obj: Any, table: Mapping[str, Any], prefix: str) -> None:
        """Set every key of `table` on the dataclass `obj`, validating each."""
        fields = fields_of(type(obj))
        hints = type_hints(type(obj))
        for key, value in table.items():
            path = f"{prefix}{key}"
            if key not in fields:
                known = ", ".join(fields)
                raise self.error(path, f"unknown key (known keys here: {known})")
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise self.error(path, f"expected a table [{path}], got {brief(value)}")
                self.apply_table(getattr(obj, key), value, f"{path}.")
            else:
                self.set(obj, key, self.value(tp, value, fields[key].metadata, path), path)

    def value(self, tp: Any, value: Any, meta: Mapping[str, Any], path: str) -> Any:
        if typing.get_origin(tp) is list:
            return self.list_value(tp, value, meta, path)
        try:
            return coerce(tp, value, meta, self.from_text)
        except ValueError as exc:
            raise self.error(path, str(exc)) from None

    def list_value(self, tp: Any, value: Any, meta: Mapping[str, Any], path: str) -> list[Any]:
        (item_tp,) = typing.get_args(tp)
        if self.from_text and isinstance(value, str):
            parsed = parse_text_value(value)
            if isinstance(parsed, list):
                value = parsed
            elif item_tp is str:
                value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise self.error(path, f"expected {describe(tp)}, got {brief(value)}")
        out: list[Any] = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if dataclasses.is_dataclass(item_tp):
                if not isinstance(item, dict):
                    raise self.error(item_path, f"expected a table, got {brief(item)}")
                obj = item_tp()
                self.apply_table(obj, item, f"{item_path}.")
                out.append(obj)
            else:
                # A list's constraints are its items' (min/max of a list would mean nothing).
                item_meta = {
                    k: meta[k] for k in ("item_regex", "regex", "cidr", "min", "max") if k in meta
                }
                try:
                    out.append(coerce(item_tp, item, item_meta, self.from_text))
                except ValueError as exc:
                    raise self.error(item_path, str(exc)) from None
        return out


def set_path(cfg: Any, dotted: str, raw: str, loader: Loader) -> None:
    parts = dotted.split(".")
    obj = cfg
    for depth, part in enumerate(parts):
        fields = fields_of(type(obj))
        path = ".".join(parts[: depth + 1])
        if part not in fields:
            raise loader.error(path, f"unknown key (known keys here: {', '.join(fields)})")
        tp = type_hints(type(obj))[part]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                parsed = parse_text_value(raw)
                if not isinstance(parsed, dict):
                    raise loader.error(path, f"expected a table, got {brief(raw)}")
                loader.apply_table(getattr(obj, part), parsed, f"{path}.")
                return
            obj = getattr(obj, part)
        else:
            if not last:
                raise loader.error(path, f"is {describe(tp)}, not a table")
            loader.set(obj, part, loader.value(tp, raw, fields[part].metadata, path), path)
            return


# ---------------------------------------------------------------- rendering


def toml_value(tp: Any, value: Any) -> str:
    unit = unit_of(tp)
    if unit in (Unit.SIZE, Unit.RATE):
        text = format_size(value)
        if text == "0":
            return "0"
        return f'"{text}/s"' if unit == Unit.RATE else f'"{text}"'
    if unit == Unit.DURATION:
        text = format_duration(value)
        try:
            if parse_duration(text) == value:
                return f'"{text}"'
        except ValueError:
            pass
        return repr(float(value))  # seconds as a TOML float: 2e-16 has no short text form
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # A TOML literal string keeps regex backslashes readable.
        return f"'{value}'" if "'" not in value and "\n" not in value else _basic_string(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        (item_tp,) = typing.get_args(tp)
        return "[" + ", ".join(toml_value(item_tp, v) for v in value) + "]"
    raise AssertionError(f"cannot render {value!r}")


def _basic_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


# Renders a key's source beside it (config check); None: its documentation above it.
SourceOf = typing.Callable[[str], str] | None


def render(cfg: Any, header: list[str], reserved: Mapping[str, str], source_of: SourceOf) -> str:
    """A configuration as TOML: `header`, then every key (`reserved`: the role's
    `# reserved:` marks, by dotted key, section or "" for all)."""
    lines = list(header)
    whole = reserved.get("")
    if whole:
        lines.append(f"# reserved: {whole}")
    top_level: list[str] = []
    hints = type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            top_level += _key_lines(reserved, f, tp, getattr(cfg, f.name), f.name, source_of)
    if top_level:
        lines += ["", *top_level]
    for f in dataclasses.fields(cfg):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += ["", *_table_notes(reserved, tp, f.name, source_of), f"[{f.name}]"]
            lines += _render_section(reserved, getattr(cfg, f.name), f.name, f.name, source_of)
    return "\n".join(lines) + "\n"


def _table_notes(reserved: Mapping[str, str], tp: Any, path: str, source_of: SourceOf) -> list[str]:
    """The comment lines above a table: its doc (conf files), and why it is reserved."""
    notes = [] if source_of else [f"# {(tp.__doc__ or '').strip()}"]
    reason = reserved.get(path)
    return notes + ([f"# reserved: {reason}"] if reason else [])


def _key_lines(
    reserved: Mapping[str, str],
    f: dataclasses.Field[Any],
    tp: Any,
    value: Any,
    path: str,
    source_of: SourceOf,
) -> list[str]:
    lines = [] if source_of else [f"# {f.metadata['doc']}"]
    reason = reserved.get(path)
    if reason:
        lines.append(f"# reserved: {reason}")
    text = f"{f.name} = {toml_value(tp, value)}"
    return [*lines, f"{text}  # {source_of(path)}" if source_of else text]


def _render_section(
    reserved: Mapping[str, str], section: Any, name: str, path: str, source_of: SourceOf
) -> list[str]:
    """A table's keys, then its subtables; `name` heads them, `path` names its keys
    (`proxy.rules[0]` for the first item of a list of tables)."""
    lines: list[str] = []
    tables: list[str] = []
    hints = type_hints(type(section))
    for f in dataclasses.fields(section):
        tp = hints[f.name]
        value = getattr(section, f.name)
        key = f"{path}.{f.name}"
        item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item_tp is not None and dataclasses.is_dataclass(item_tp):
            if source_of is None:
                tables.append(f"# {f.metadata['doc']}")
            elif not value:
                lines.append(f"{f.name} = []  # {source_of(key)}")
            head = f"[[{name}.{f.name}]]"
            if source_of is not None:
                head += f"  # {source_of(key)}"
            for i, item in enumerate(value):
                item_lines = _render_section(
                    reserved, item, f"{name}.{f.name}", f"{key}[{i}]", source_of
                )
                tables += ["", head, *item_lines]
            continue
        if dataclasses.is_dataclass(tp):
            tables += [
                "",
                *_table_notes(reserved, tp, key, source_of),
                f"[{name}.{f.name}]",
                *_render_section(reserved, value, f"{name}.{f.name}", key, source_of),
            ]
            continue
        lines += _key_lines(reserved, f, tp, value, key, source_of)
    if tables:
        lines += tables if tables[0] == "" else ["", *tables]
    return lines
