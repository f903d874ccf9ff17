"""Durations and sizes as people write them in YAML: "250ms", "5s", "2m", "64KiB", "1MiB".

Pure parsing; config.py turns a ValueError into a message with the file and key path.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class Duration(float):
    """Seconds; written as "250ms", "5s", "2m" in YAML."""


class Size(int):
    """Bytes; written as "64KiB", "1MiB" in YAML."""


def parse_duration(value: object) -> float:
    """Seconds from a string with a unit; a bare number is refused so "5" never means 5 ms or 5 s by guess."""
    m = _DURATION.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f'expected a duration like "250ms", "5s" or "2m", got {value!r}')
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: object) -> int:
    """Bytes from "64KiB", "1MiB", "512MB" or a plain integer count of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f'expected a size like "64KiB" or "1MiB", got {value!r}')
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling, so --check-config prints what a person would write."""
    ms = round(seconds * 1000, 3)
    for unit, factor in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= factor and ms % factor == 0:
            return f"{int(ms // factor)}{unit}"
    return f"{ms:g}ms"


def format_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def to_duration(value: object) -> Duration:
    """A config duration: a unit is required, and zero or less bounds nothing."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return Duration(seconds)


def to_size(value: object) -> Size:
    return Size(parse_size(value))
