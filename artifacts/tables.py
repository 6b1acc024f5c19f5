"""Rows for table artifacts and JSON: numbers rounded for reading, non-finite ones spelled out."""

from __future__ import annotations

import math

SIGNIFICANT_DIGITS = 4


def json_safe(value: object) -> object:
    """Non-finite numbers as strings: JSON has no -inf, and the UI should still show it."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def readable(value: object) -> object:
    """A float to 4 significant digits (-57.06 rather than -57.06225485801697); anything else as JSON allows."""
    value = json_safe(value)
    if isinstance(value, float) and value != 0.0:
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return value


def readable_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{str(name): readable(value) for name, value in row.items()} for row in rows]
