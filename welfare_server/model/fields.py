"""Strict checks of one field's value, shared by every boundary that validates a request (the
engine's requests, steering specs and monitors, the configs): types are exact (a bool is not an
int, a float is not an int, a string is not a number), nothing is coerced, and a refusal names
the field, the value and the rule. Each check raises the boundary's own error class (a ValueError
subclass such as RequestRefused or SteeringError) and returns the value in its canonical type.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch



class InvalidRequest(ValueError):
    """A request (or config) field breaks a rule. `field` names it as a path ("sampling.top_p",
    "steering.terms[0].layers[2]"); the message says the value and the rule. The engine's
    RequestRefused and steering's SteeringError are its kinds; the server turns either into
    INVALID_ARGUMENT with this field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        if field is None and ": " in message:
            field = message.split(": ", 1)[0]
        self.field = field or ""


Err = type[ValueError]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return type(value).__name__


def is_int(value: Any) -> bool:
    """A Python or numpy integer, but never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, field: str, error: Err, lo: int | None = None, hi: int | None = None,
              rule: str = "") -> int:
    """An integer in [lo, hi] (either bound optional)."""
    if not is_int(value):
        raise error(f"{field}: {_show(value)} is a {_kind(value)}, not an int{rule_suffix(lo, hi, rule)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{field}: {value} is out of range{rule_suffix(lo, hi, rule)}")
    return value


def check_number(value: Any, field: str, error: Err, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, rule: str = "") -> float:
    """A finite real number (int or float, not bool) in [lo, hi], or (lo, hi] with lo_open."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{field}: {_show(value)} is a {_kind(value)}, not a number"
                    f"{rule_suffix(lo, hi, rule, lo_open)}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{field}: {value} is not finite{rule_suffix(lo, hi, rule, lo_open)}")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise error(f"{field}: {value} is out of range{rule_suffix(lo, hi, rule, lo_open)}")
    return value


def check_bool(value: Any, field: str, error: Err) -> bool:
    if not isinstance(value, bool):
        raise error(f"{field}: {_show(value)} is a {_kind(value)}, not a bool (True or False)")
    return value


def check_str(value: Any, field: str, error: Err, *, max_len: int | None = None, nonempty: bool = True,
              choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str):
        raise error(f"{field}: {_show(value)} is a {_kind(value)}, not a string")
    if nonempty and not value:
        raise error(f"{field}: empty string")
    if max_len is not None and len(value) > max_len:
        raise error(f"{field}: {len(value)} characters, more than the limit {max_len}")
    if choices is not None and value not in choices:
        raise error(f"{field}: {_show(value)} is not one of {list(choices)}")
    return value


def check_sequence(value: Any, field: str, error: Err, *, what: str, max_len: int | None = None,
                   limit_name: str = "", nonempty: bool = False) -> list:
    """A list or tuple (or a 1-D tensor), never a bare string, number or None; returns a list."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise error(f"{field}: a tensor of shape {tuple(value.shape)}, expected a list of {what}")
        value = value.tolist()
    elif not isinstance(value, (list, tuple)):
        raise error(f"{field}: {_show(value)} is a {_kind(value)}, expected a list of {what}")
    if nonempty and not value:
        raise error(f"{field}: empty; at least one of {what} is required")
    if max_len is not None and len(value) > max_len:
        raise error(f"{field}: {len(value)} {what}, more than {limit_name or 'the limit'}={max_len}")
    return list(value)


def check_int_list(value: Any, field: str, error: Err, *, lo: int, hi: int, what: str = "ints",
                   max_len: int | None = None, limit_name: str = "", nonempty: bool = False,
                   rule: str = "") -> list[int]:
    """A list of ints each in [lo, hi]; a tensor must have an integer dtype."""
    if isinstance(value, torch.Tensor) and (value.dtype.is_floating_point or value.dtype == torch.bool
                                            or value.dtype.is_complex):
        raise error(f"{field}: a {value.dtype} tensor, expected integer ids")
    items = check_sequence(value, field, error, what=what, max_len=max_len, limit_name=limit_name,
                           nonempty=nonempty)
    return [check_int(v, f"{field}[{i}]", error, lo, hi, rule) for i, v in enumerate(items)]


def check_tensor(value: Any, field: str, error: Err, *, shape: tuple, what: str) -> torch.Tensor:
    """A floating-point tensor of `shape` (None = any size on that axis) with finite values."""
    if not isinstance(value, torch.Tensor):
        raise error(f"{field}: {_show(value)} is a {_kind(value)}, expected a tensor of shape {what}")
    if not value.dtype.is_floating_point:
        raise error(f"{field}: dtype {value.dtype}, expected a floating-point tensor {what}")
    if value.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, value.shape)):
        raise error(f"{field}: shape {tuple(value.shape)}, expected {what}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise error(f"{field}: contains NaN or inf")
    return value


def rule_suffix(lo, hi, rule: str = "", lo_open: bool = False) -> str:
    """' (must be ...)' describing a bound, for the messages above."""
    if rule:
        return f" ({rule})"
    if lo is not None and hi is not None:
        return f" (must be in {'(' if lo_open else '['}{lo}, {hi}])"
    if lo is not None:
        return f" (must be {'>' if lo_open else '>='} {lo})"
    if hi is not None:
        return f" (must be <= {hi})"
    return ""
