"""Validators of single wire values (bool, int, float, str, bytes, lists, str maps).

Each validator checks one decoded CBOR value against a field's type and wire limits and
raises ``_Invalid`` naming what was wrong; the schema (schema.py) composes them into a
generated validator per dataclass.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any


class _Invalid(Exception):
    """Internal validation failure; ``path`` is collected innermost-first on the way out."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path: list[str] = []


_Validator = Callable[[Any], Any]
_Encoder = Callable[[Any], Any] | None  # None: the value is already CBOR-ready
# Given a variable name, a Python expression that is True when the value is valid
# as is (the generated fast path); None when the full validator must always run.
_Fast = Callable[[str], str] | None


@dataclasses.dataclass(frozen=True, slots=True)
class _TypeSpec:
    validate: _Validator  # raises _Invalid, returns the (possibly converted) value
    encode: _Encoder
    fast: _Fast
    # A list of such values at once (generated for compact records: the same result as
    # validating each, without a call per item); None: one validate call per item.
    many: _Validator | None = None


def _fmt_num(n: int | float) -> str:
    """Render big bounds readably: 1099511627776 -> 2**40, 2147483647 -> 2**31-1."""
    if isinstance(n, float):
        return repr(n)
    if n < 0:
        return "-" + _fmt_num(-n)
    if n >= 1 << 16:
        if n & (n - 1) == 0:
            return f"2**{n.bit_length() - 1}"
        if (n + 1) & n == 0:
            return f"2**{n.bit_length()}-1"
    return str(n)


def _tname(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _check(validate: _Validator, value: Any, segment: str) -> Any:
    """Slow path of generated code: full validation, naming the field on failure."""
    try:
        return validate(value)
    except _Invalid as e:
        e.path.append(segment)
        raise


def _bool(x: Any) -> Any:
    if type(x) is not bool:
        raise _Invalid(f"expected bool, got {_tname(x)}")
    return x


def _int(lo: int, hi: int) -> _Validator:
    desc = f"expected int in [{_fmt_num(lo)}, {_fmt_num(hi)}]"

    def v(x: Any) -> Any:
        if type(x) is not int:  # bool is not an int on this wire
            raise _Invalid(f"{desc}, got {_tname(x)}")
        if x < lo or x > hi:
            raise _Invalid(f"{desc}, got {x}")
        return x

    return v


def _float(lo: float, hi: float) -> _Validator:
    desc = f"expected finite float in [{_fmt_num(lo)}, {_fmt_num(hi)}]"

    def v(x: Any) -> Any:
        t = type(x)
        if t is int:
            try:
                x = float(x)
            except OverflowError:
                raise _Invalid(f"{desc}, got {x}") from None
        elif t is not float:
            raise _Invalid(f"{desc}, got {_tname(x)}")
        if not (lo <= x <= hi) or not math.isfinite(x):
            raise _Invalid(f"{desc}, got {x!r}")
        return x

    return v


def _str(min_len: int, max_len: int, choices: Any) -> _Validator:
    allowed = frozenset(choices) if choices is not None else None
    shown = "|".join(sorted(allowed)) if allowed is not None else ""

    def v(x: Any) -> Any:
        if type(x) is not str:
            raise _Invalid(f"expected str, got {_tname(x)}")
        n = len(x)
        if n > max_len or n < min_len:
            raise _Invalid(f"expected str of {min_len}..{max_len} chars, got {n}")
        if allowed is not None and x not in allowed:
            raise _Invalid(f"expected one of {shown}, got {x[:64]!r}")
        return x

    return v


def _bytes(min_len: int, max_len: int) -> _Validator:
    desc = f"{min_len}" if min_len == max_len else f"{min_len}..{max_len}"

    def v(x: Any) -> Any:
        if type(x) is not bytes:
            raise _Invalid(f"expected bytes, got {_tname(x)}")
        n = len(x)
        if n > max_len or n < min_len:
            raise _Invalid(f"expected {desc} bytes, got {n}")
        return x

    return v


def _list(item: _TypeSpec, max_items: int) -> _TypeSpec:
    item_v, item_e = item.validate, item.encode
    many = item.many
    if many is None:

        def many(xs: list[Any]) -> list[Any]:
            return [item_v(it) for it in xs]

    def v(x: Any) -> Any:
        if type(x) is not list:
            raise _Invalid(f"expected array, got {_tname(x)}")
        if len(x) > max_items:
            raise _Invalid(f"expected at most {max_items} items, got {len(x)}")
        try:
            return many(x)
        except _Invalid:
            pass
        for i, it in enumerate(x):  # error path: find the culprit again to name its index
            _check(item_v, it, f"[{i}]")
        raise AssertionError("unreachable: item validation is deterministic")

    if item_e is None:
        return _TypeSpec(v, None, None)
    enc = item_e
    return _TypeSpec(v, lambda xs: [enc(x) for x in xs], None)


def _str_dict(max_items: int, max_len: int) -> _Validator:
    def v(x: Any) -> Any:
        if type(x) is not dict:
            raise _Invalid(f"expected map, got {_tname(x)}")
        if len(x) > max_items:
            raise _Invalid(f"expected at most {max_items} entries, got {len(x)}")
        for key, value in x.items():
            if type(key) is not str or len(key) > max_len:
                got = f"str of {len(key)} chars" if type(key) is str else _tname(key)
                raise _Invalid(f"expected keys of at most {max_len} chars, got {got}")
            if type(value) is not str or len(value) > max_len:
                got = f"str of {len(value)} chars" if type(value) is str else _tname(value)
                e = _Invalid(f"expected str of at most {max_len} chars, got {got}")
                e.path.append(f"[{key[:32]!r}]")
                raise e
        return x

    return v
