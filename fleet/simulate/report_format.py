"""The cells of the simulate report: numbers, accuracies, seconds and names as Markdown text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

_FLOAT_BITS = 32.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> str:
    """Integers as they are, floats to four significant figures (no exponent below 10^4)."""
    if value is None:
        return "-"
    if not _is_number(value):
        return _cell(_value(value))
    if isinstance(value, int) or (
        math.isfinite(value) and value == int(value) and abs(value) < 1e15
    ):
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _accuracy(value: Any) -> str:
    return f"{value:.4f}" if _is_number(value) else _number(value)


def _seconds(value: Any) -> str:
    """Seconds with precision that suits their size: 812 s, 41.2 s, 0.003 s."""
    if not _is_number(value):
        return _number(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def _value(value: Any) -> str:
    if _is_number(value) or value is None:
        return _number(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _natural_key(name: str) -> list:
    """dev2 before dev10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def _acc_by_bits(name: str, method: Mapping) -> dict[float, Any]:
    """A method's accuracy per bit-width, with the JSON's string keys as numbers."""
    out = {}
    for key, acc in (method.get("acc_by_bits") or {}).items():
        try:
            out[float(key)] = acc
        except ValueError:
            raise ValueError(f"method {name!r}: bit-width {key!r} is not a number") from None
    return out


def _bits_label(bits: float) -> str:
    return "fp32" if bits == _FLOAT_BITS else _number(bits)


# Figures over seeds with their 95% intervals (results.json `ci95`, docs/simulation.md#statistics).


def _pair(ci: Any) -> tuple[float, float] | None:
    """An interval `[lo, hi]` from results.json, or None where there is none."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(x) for x in ci):
        return float(ci[0]), float(ci[1])
    return None


def _plus_minus(value: Any, ci: Any, fmt: Callable[[Any], str]) -> str:
    """`mean ± half-width` of a t interval (symmetric about the mean), or the value alone."""
    pair = _pair(ci)
    if pair is None or not _is_number(value):
        return fmt(value)
    return f"{fmt(value)} ± {fmt((pair[1] - pair[0]) / 2)}"


def _bracketed(value: Any, ci: Any, fmt: Callable[[Any], str] = _number) -> str:
    """`value [lo, hi]`, for intervals that need not be symmetric (bootstrap, differences)."""
    pair = _pair(ci)
    if pair is None or not _is_number(value):
        return fmt(value)
    return f"{fmt(value)} [{fmt(pair[0])}, {fmt(pair[1])}]"


def _signed_accuracy(value: Any) -> str:
    return f"{value:+.4f}" if _is_number(value) else _number(value)


def _signed_seconds(value: Any) -> str:
    return ("+" if _is_number(value) and value > 0 else "") + _seconds(value)


def _signed_number(value: Any) -> str:
    return ("+" if _is_number(value) and value > 0 else "") + _number(value)


def _acc_by_bits_ci(method: Mapping) -> dict[float, Any]:
    """A method's `ci95.acc_by_bits` with the JSON's string keys as numbers ({} without)."""
    ci = method.get("ci95")
    by_bits = ci.get("acc_by_bits") if isinstance(ci, Mapping) else None
    if not isinstance(by_bits, Mapping):
        return {}
    out = {}
    for key, pair in by_bits.items():
        try:
            out[float(key)] = pair
        except ValueError:
            continue  # `_acc_by_bits` reports a bad width
    return out
