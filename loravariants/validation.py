"""Validation of user-given numbers, shared by every module that takes settings (adapter configs,
training, evaluation, the base model, long-context extension): one message format for a value
out of its range."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_range"]


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise ``ValueError`` naming the field and the allowed range when ``value`` is outside it.

    Args:
        name: field name used in the message.
        value: the value to check.
        low, high: bounds (``None`` = unbounded).
        low_open, high_open: exclude the bound itself.
        integer: require an ``int`` (``bool`` is rejected).
    """
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    allowed = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ValueError(f"{name} must be {kind} in {allowed}, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
