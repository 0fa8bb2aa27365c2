"""Parsing and printing sizes, rates and durations ("4MiB", "20MB/s", "5m")."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
# A number longer than this is a typo or an attack, not a setting: refusing it
# keeps int() from its digit limit (or quadratic time) and float() from inf.
MAX_NUMBER_LENGTH = 30


def _shown(text: str) -> str:
    """repr of user text, cut short so an absurd value cannot flood an error message."""
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _check_length(number: str, text: str) -> None:
    if len(number) > MAX_NUMBER_LENGTH:
        raise ValueError(f"{_shown(text)} has a number longer than {MAX_NUMBER_LENGTH} characters")


def parse_size(text: str) -> int:
    """'4MiB' → 4194304, '1.5GB' → 1500000000, '512' → 512 (bytes).

    Exact arithmetic: a float would round sizes above 2**53 bytes.
    """
    m = _NUMBER_UNIT.match(text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{_shown(text)} is not a size (examples: 512, 4MiB, 1.5GB)")
    _check_length(m.group(1), text)
    value = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value.denominator != 1:
        raise ValueError(f"{_shown(text)} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str) -> int:
    """'20MB/s' → 20000000 bytes/s; '/s' may be omitted."""
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    try:
        return parse_size(t)
    except ValueError:
        raise ValueError(f"{_shown(text)} is not a rate (examples: 0, 20MB/s, 100MiB/s)") from None


def parse_duration(text: str) -> float:
    """'30s' → 30.0, '5m' → 300.0, '1h30m' → 5400.0, '250ms' → 0.25, '12' → 12.0.

    'nan' and 'inf' are refused: nan passes every range check, inf every timeout.
    """
    t = text.strip().lower()
    try:
        total = float(t)
    except ValueError:
        total = _sum_duration_parts(t, text)
    else:
        _check_length(t, text)
    if not math.isfinite(total):
        raise ValueError(f"{_shown(text)} is not a finite duration")
    return total


def _sum_duration_parts(t: str, text: str) -> float:
    """'1h30m' → 5400.0; ValueError unless `t` is nothing but number-unit parts."""
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(t):
        if m.start() != pos:
            break
        _check_length(m.group(1), text)
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(t):
        raise ValueError(f"{_shown(text)} is not a duration (examples: 30s, 5m, 1h30m, 250ms)")
    return total


def format_size(n: int) -> str:
    """Exact, readable: 4194304 → '4MiB', 1000 → '1kB', 1234 → '1234'."""
    if n == 0:
        return "0"
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    for unit, factor in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    """Exact, readable: 300 → '5m', 0.25 → '250ms', 90 → '90s'."""
    if seconds == 0:
        return "0s"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    ms = seconds * 1000
    if ms == int(ms):
        return f"{int(ms)}ms"
    # Positional digits of the shortest repr: '1e-06s' would not parse back.
    return f"{Decimal(repr(seconds)):f}s"


def human_bytes(n: float) -> str:
    """Approximate, for people: 1536 → '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
