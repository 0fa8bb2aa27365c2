"""Traffic by source over time as an inline SVG, drawn on the server (no chart library,
no script): one stacked bar per hour, peer-to-peer at the bottom, then back-to-source,
then local hits; a few gridlines with their sizes; the hours along the bottom."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 880, 260
LEFT, RIGHT, TOP, BOTTOM = 70, 12, 12, 34
SERIES = (("bytes_p2p", "p2p"), ("bytes_source", "source"), ("bytes_local", "local"))


@dataclass(frozen=True)
class Hour:
    label: str  # e.g. "14:00"
    bytes_p2p: int
    bytes_source: int
    bytes_local: int


def _nice(top: float) -> float:
    """A round number at or above `top` for the axis (1, 2 or 5 times a power of 1024)."""
    if top <= 0:
        return 1024.0
    unit = 1.0
    while unit * 1024 <= top:
        unit *= 1024
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1024):
        if unit * step >= top:
            return unit * step
    return unit * 1024


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def traffic_svg(hours: Sequence[Hour]) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _nice(max((h.bytes_p2p + h.bytes_source + h.bytes_local for h in hours), default=0))
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        'aria-label="bytes by source per hour" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i in range(5):
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_size(value)}</text>'
        )
    n = max(1, len(hours))
    slot = plot_w / n
    bar = max(2.0, slot * 0.7)
    every = max(1, n // 12)
    for i, h in enumerate(hours):
        x = LEFT + i * slot + (slot - bar) / 2
        y = TOP + plot_h
        tip = escape(
            f"{h.label}: p2p {_size(h.bytes_p2p)}, source {_size(h.bytes_source)}, "
            f"local {_size(h.bytes_local)}"
        )
        out.append(f"<g><title>{tip}</title>")
        for field, css in SERIES:
            value = getattr(h, field)
            if value <= 0:
                continue
            height = plot_h * value / top
            y -= height
            out.append(
                f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{height:.1f}"/>'
            )
        out.append("</g>")
        if i % every == 0:
            out.append(
                f'<text class="axis" x="{x + bar / 2:.1f}" y="{HEIGHT - 12}" '
                f'text-anchor="middle">{escape(h.label)}</text>'
            )
    out.append("</svg>")
    return "".join(out)
