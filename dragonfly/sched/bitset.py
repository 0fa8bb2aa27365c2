"""A growable bitmap of piece numbers (sans-I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["Bitset"]


class Bitset:
    """Finished piece numbers: a growable bitmap (a set of ints costs ~40x the memory,
    which matters with 10,000 simulated peers of 500-piece tasks)."""

    __slots__ = ("_bits", "_count")

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def add(self, n: int) -> bool:
        """Set bit n; True if it was not set before."""
        idx = n >> 3
        bits = self._bits
        if idx >= len(bits):
            bits.extend(bytes(idx + 1 - len(bits)))
        mask = 1 << (n & 7)
        if bits[idx] & mask:
            return False
        bits[idx] |= mask
        self._count += 1
        return True

    def update(self, numbers: Iterable[int]) -> None:
        """Set every bit in ``numbers`` (non-negative) at once: one big-int OR, where a
        report of many pieces would cost a call each."""
        mask = 0
        for n in numbers:
            mask |= 1 << n
        if not mask:
            return
        bits = self._bits
        old = int.from_bytes(bits, "little")
        new = old | mask
        if new == old:
            return
        self._bits = bytearray(new.to_bytes(max(len(bits), (new.bit_length() + 7) >> 3), "little"))
        self._count = new.bit_count()

    def fill(self, count: int) -> None:
        """Set bits 0..count-1 (a holder of the whole task)."""
        if count <= 0:
            return
        bits = self._bits
        new = int.from_bytes(bits, "little") | ((1 << count) - 1)
        self._bits = bytearray(new.to_bytes(max(len(bits), (new.bit_length() + 7) >> 3), "little"))
        self._count = new.bit_count()

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int) or n < 0:
            return False
        idx = n >> 3
        return idx < len(self._bits) and bool(self._bits[idx] & (1 << (n & 7)))

    def __len__(self) -> int:
        return self._count

    def has_outside(self, other: Bitset) -> bool:
        """Whether some piece here is missing from ``other`` (a parent useful to a child)."""
        if self._count > other._count:
            return True  # more pieces than the other has: one of them must be new to it
        return bool(int.from_bytes(self._bits, "little") & ~int.from_bytes(other._bits, "little"))

    def __iter__(self) -> Iterator[int]:
        for idx, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield idx * 8 + bit
