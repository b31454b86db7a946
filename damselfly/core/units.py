"""Sizes and rates as people write them: ``128MiB``, ``4M``, ``50MB/s``."""

from __future__ import annotations

import re

from damselfly.core.errors import InvalidArgument

_UNITS = {
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
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from ``"128MiB"`` (binary) or ``"50MB"`` (decimal) or a plain number."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative, got {text}")
        return text
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgument(f"not a size: {text!r} (try 128MiB, 4MB or 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str | int) -> int:
    """Bytes per second from ``"50MB/s"``, ``"400Mbit/s"`` or a plain number."""
    if isinstance(text, int):
        return parse_size(text)
    t = text.strip()
    if t.lower().endswith("/s"):
        t = t[:-2]
    if t.lower().endswith("bit"):
        return parse_size(t[:-3]) // 8
    return parse_size(t)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*$")
_SECONDS = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float) -> float:
    """Seconds from ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"`` or a plain number of seconds."""
    if isinstance(text, int | float):
        if text < 0:
            raise InvalidArgument(f"duration must not be negative, got {text}")
        return float(text)
    m = _DURATION.match(text.lower())
    if not m:
        raise InvalidArgument(f"not a duration: {text!r} (try 90s, 30m, 2h or 7d)")
    return float(m.group(1)) * _SECONDS[m.group(2)]
