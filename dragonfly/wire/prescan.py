"""Structural pre-scan of untrusted CBOR bytes, before cbor2 sees them (sans-I/O).

One pass over the raw frame: no indefinite lengths, no tags, no simple values other
than false/true/null, nesting at most ``MAX_DEPTH``, map keys must be text strings and
unique, declared lengths must fit, exactly one item with no trailing bytes.  Anything
else raises ``ProtocolError``.
"""

from dragonfly.wire.errors import ProtocolError

__all__ = ["MAX_DEPTH"]

MAX_DEPTH = 8


def _scalar_sizes() -> bytes:
    """Initial byte -> total size of a fixed-size scalar item, 0 for anything else.

    Scalars: integers (major 0, 1), false/true/null and half/single/double floats.
    """
    sizes = bytearray(256)
    for ib in range(256):
        major, ai = ib >> 5, ib & 31
        if major in (0, 1) or (major == 7 and ai in (20, 21, 22, 25, 26, 27)):
            if ai < 24:
                sizes[ib] = 1
            elif ai < 28:
                sizes[ib] = 1 + (1 << (ai - 24))
    return bytes(sizes)


_SCALAR_SIZE = _scalar_sizes()


def _flat_sizes() -> bytes:
    """Initial byte -> total size of a scalar or of a string of < 24 bytes, else 0."""
    sizes = bytearray(_SCALAR_SIZE)
    for ib in (*range(0x40, 0x58), *range(0x60, 0x78)):
        sizes[ib] = 1 + (ib & 31)
    return bytes(sizes)


_FLAT_SIZE = _flat_sizes()


def _prescan(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Check the raw CBOR structure before cbor2 sees it; raise ProtocolError on anything odd.

    One iterative pass, O(bytes), no recursion.  Map keys must be text strings;
    duplicates are found by comparing their content bytes (so a non-minimal length
    head cannot smuggle a duplicate past the check).  Overrunning the end shows up
    as an IndexError or as ``pos > n`` at the end: both mean truncated.
    """
    n = len(data)
    pos = 0
    sizes = _SCALAR_SIZE
    stack: list[tuple[int, set[bytes] | None]] = []  # the enclosing containers' state
    rem = 1  # items (map: entries) left in the current container; the root holds one
    keys: set[bytes] | None = None  # seen keys when the current container is a map
    try:
        while True:
            if keys is not None:  # a map entry: first its key, which must be a text string
                ib = data[pos]
                if 0x60 <= ib <= 0x77:
                    start = pos + 1
                    end = start + ib - 0x60
                elif ib == 0x78:  # a one-byte length, inline: the common long-ish key
                    start = pos + 2
                    end = start + data[pos + 1]
                else:
                    if not 0x78 <= ib <= 0x7B:
                        if ib == 0x7F or ib == 0xBF or ib == 0x9F or ib == 0x5F:
                            raise ProtocolError("indefinite-length item not allowed")
                        raise ProtocolError("map key must be a text string")
                    start, end = _long_string(data, pos, n)
                if end > n:
                    raise ProtocolError(
                        f"string of {end - start} bytes exceeds the {n - start} remaining bytes"
                    )
                key = data[start:end]
                if key in keys:
                    raise ProtocolError(f"duplicate map key {_show_key(key)}")
                keys.add(key)
                pos = end
            ib = data[pos]
            size = sizes[ib]
            if size:
                pos += size
            else:
                major = ib >> 5
                ai = ib & 31
                if ai > 27:
                    if ai == 31:
                        raise ProtocolError("indefinite-length item not allowed")
                    raise ProtocolError(f"reserved CBOR additional info {ai} at byte {pos}")
                if major == 2 or major == 3:
                    if ai < 24:
                        start = pos + 1
                        end = start + ai
                    elif ai == 24:  # one-byte length (a digest, an id), inline: hot
                        start = pos + 2
                        end = start + data[pos + 1]
                    else:
                        start, end = _long_string(data, pos, n)
                    if end > n:
                        raise ProtocolError(
                            f"string of {end - start} bytes exceeds the {n - start} remaining bytes"
                        )
                    pos = end
                elif major == 4 or major == 5:
                    if len(stack) >= max_depth:
                        raise ProtocolError(f"nesting deeper than {max_depth}")
                    if ai < 24:
                        count = ai
                        pos += 1
                    else:
                        start, _ = _long_string(data, pos, n)
                        count = int.from_bytes(data[pos + 1 : start], "big")
                        pos = start
                    if (count if major == 4 else 2 * count) > n - pos:
                        raise ProtocolError(
                            f"container of {count} items exceeds the {n - pos} remaining bytes"
                        )
                    if count and major == 4:
                        # Arrays of scalars and short strings (a compact record, a list
                        # of IDs), and arrays of those, are skipped in one tight loop;
                        # anything else, or an overrun, and the general path scans it.
                        end = _skip_flat(data, pos, count, len(stack) + 1 < max_depth)
                        if 0 <= end <= n:
                            pos = end
                            count = 0
                    if count:
                        stack.append((rem, keys))
                        rem = count
                        keys = set() if major == 5 else None
                        continue
                elif major == 6:
                    raise ProtocolError("CBOR tags not allowed")
                else:  # major 7 (0 and 1 are all scalars)
                    raise ProtocolError(f"CBOR simple value {ib & 31} not allowed")
            # one item finished: close every container it completes
            rem -= 1
            while not rem:
                if not stack:
                    break
                rem, keys = stack.pop()
                rem -= 1
            else:
                continue
            break
    except IndexError:
        raise ProtocolError(f"truncated CBOR item ({n} bytes)") from None
    if pos > n:
        raise ProtocolError(f"truncated CBOR item ({n} bytes)")
    if pos != n:
        raise ProtocolError(f"trailing bytes after CBOR item ({pos} of {n} consumed)")


def _skip_flat(data: bytes, pos: int, count: int, nested: bool) -> int:
    """Where ``count`` items from ``pos`` end when each is a scalar or a string of < 256
    bytes, or (``nested``: one more level is within the depth) an array of < 24 such
    items; -1 when one is not. The end may be past the data: the caller checks."""
    flat = _FLAT_SIZE
    try:
        for _ in range(count):
            ib = data[pos]
            size = flat[ib]
            if size:
                pos += size
            elif ib == 0x58 or ib == 0x78:
                pos += 2 + data[pos + 1]
            elif nested and 0x80 <= ib <= 0x97:
                pos = _skip_flat(data, pos + 1, ib - 0x80, False)
                if pos < 0:
                    return -1
            else:
                return -1
    except IndexError:
        return -1
    return pos


def _long_string(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """(start, end) of the payload of the string whose head at ``pos`` has a 1..8-byte
    length argument (also used for container counts: then start is past the head)."""
    start = pos + 1 + (1 << ((data[pos] & 31) - 24))
    if start > n:
        raise IndexError
    length = data[pos + 1] if start == pos + 2 else int.from_bytes(data[pos + 1 : start], "big")
    return start, start + length


def _show_key(key: bytes) -> str:
    try:
        return repr(key.decode("utf-8")[:64])
    except UnicodeDecodeError:
        return repr(key[:64])
