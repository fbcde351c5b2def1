"""Strict checks of untrusted scalar values: the value's own type or an error, never a conversion.

A JSON header, a Flower record or a settings file says ``3.7`` where a count belongs, ``"12"``,
``true``, ``"false"`` or ``1e999``: Python's ``int()``/``bool()`` would turn each into something
plausible and change what the run does. These helpers accept only what the field's type is
(``bool`` is not an ``int`` here) and raise ValueError with a short reason naming ``what``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

# Counts beyond 2**53 lose exactness as floats (weights are n_k / sum n_j): no real count is that big.
MAX_COUNT = 2**53


def strict_int(value, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{what} must be {range_text(low, high)}, got {value}")
    return value


def strict_float(value, what: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """``value`` as a float if it is an int or float (not a bool), finite (unless ``finite=False``) and in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {_show(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int too big for a float
        raise ValueError(f"{what} must be a finite number, got an integer of {value.bit_length()} bits") from None
    if finite and not math.isfinite(out):
        raise ValueError(f"{what} must be a finite number, got {out}")
    if math.isnan(out):
        return out
    too_low = low is not None and (out <= low if low_open else out < low)
    too_high = high is not None and (out >= high if high_open else out > high)
    if too_low or too_high:
        raise ValueError(f"{what} must be {range_text(low, high, low_open, high_open)}, got {out:g}")
    return out


def strict_bool(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {_show(value)}")
    return value


def strict_str(value, what: str, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {_show(value)}")
    if nonempty and not value:
        raise ValueError(f"{what} must be a non-empty string")
    return value


def strict_mapping(value, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a mapping, got {_show(value)}")
    return value


def json_value(text, what: str):
    """The JSON value in ``text`` (str or bytes), never deeper than Python can recurse: ValueError otherwise."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"{what} must be JSON text, got {_show(text)}")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None


def json_object(text, what: str) -> dict:
    """A JSON object parsed from ``text`` (see :func:`json_value`)."""
    value = json_value(text, what)
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def range_text(low, high, low_open=False, high_open=False) -> str:
    """A range in words, as errors and the settings help say it: ">= 1", "> 0", "in [0, 1)"."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    return f"{'<' if high_open else '<='} {_num(high)}"


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _show(value) -> str:
    """A short description of a bad value: its type and (cut) representation."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
