"""Shared pieces of the three problem models: errors, tolerance, typed JSON readers, result rules.

Every reader here takes the *key path* of the value it checks (``stages[3].F``) so that a bad
input is reported as one line naming the offending key, as ``shared/formats.md`` requires.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

STATUSES = ("optimal", "feasible", "infeasible", "unknown")
EMPTY_STATUSES = ("infeasible", "unknown")


class PipeschedError(Exception):
    """Base class of every error pipesched raises on purpose."""


class FormatError(PipeschedError, ValueError):
    """Malformed input: wrong JSON, wrong type, missing key, out-of-range value, cycle, ...

    The message is one line: ``[file: ]key.path: what is wrong``.
    """


class ValidationError(PipeschedError):
    """A well-formed schedule that breaks a validity rule of formats.md.

    ``rule`` names the rule (``"1.2 rule 3"``), ``op`` the offending operation when there is one.
    """

    def __init__(self, rule: str, message: str, op: str | None = None):
        self.rule, self.op = rule, op
        super().__init__(f"{rule}: {message}")


# --------------------------------------------------------------------------------------------
# Tolerance (formats.md: 1e-6 * (1 + max(|x|, |y|)))


def tol(x: float, y: float) -> float:
    return 1e-6 * (1.0 + max(abs(x), abs(y)))


def approx_eq(x: float, y: float) -> bool:
    return abs(x - y) <= tol(x, y)


def approx_le(x: float, y: float) -> bool:
    return x <= y + tol(x, y)


def approx_lt(x: float, y: float) -> bool:
    """x < y by more than the tolerance."""
    return x < y - tol(x, y)


# --------------------------------------------------------------------------------------------
# Typed readers. Each returns the value or raises FormatError naming `key`.


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def need(obj: Mapping[str, Any], name: str, path: str) -> Any:
    if name not in obj:
        raise FormatError(f"{join(path, name)}: missing required key")
    return obj[name]


def join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def as_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FormatError(f"{key}: expected an object, got {_type_name(value)}")
    return value


def as_list(value: Any, key: str, *, nonempty: bool = False) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise FormatError(f"{key}: expected a list, got {_type_name(value)}")
    if nonempty and not value:
        raise FormatError(f"{key}: must not be empty")
    return value


def as_int(value: Any, key: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not bool, not 1.0) in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{key}: expected an integer, got {_type_name(value)} {value!r}")
    if lo is not None and value < lo:
        raise FormatError(f"{key}: must be >= {lo}, got {value}")
    if hi is not None and value >= hi:
        raise FormatError(f"{key}: must be < {hi}, got {value}")
    return value


def as_number(value: Any, key: str, *, nonneg: bool = True) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{key}: expected a number, got {_type_name(value)} {value!r}")
    if not math.isfinite(value):
        raise FormatError(f"{key}: must be finite, got {value}")
    if nonneg and value < 0:
        raise FormatError(f"{key}: must be >= 0, got {value}")
    return value


def as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise FormatError(f"{key}: expected true or false, got {_type_name(value)} {value!r}")
    return value


def as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{key}: expected a string, got {_type_name(value)}")
    return value


def optional(obj: Mapping[str, Any], name: str, default: Any) -> Any:
    """An optional key: absent or null takes the default."""
    value = obj.get(name)
    return default if value is None else value


def check_format(obj: Mapping[str, Any], expected: str, *, required: bool = True) -> None:
    if "format" not in obj:
        if required:
            raise FormatError(f"format: missing required key (expected {expected!r})")
        return
    if obj["format"] != expected:
        raise FormatError(f"format: expected {expected!r}, got {obj['format']!r}")


# --------------------------------------------------------------------------------------------
# Result files (schedules, placements)


def read_result_fields(obj: Mapping[str, Any], objective_key: str) -> dict[str, Any]:
    """The fields every result file shares, type-checked."""
    lower_bound = obj.get("lower_bound")
    status = as_str(need(obj, "status", ""), "status")
    if status not in STATUSES:
        raise FormatError(f"status: must be one of {', '.join(STATUSES)}; got {status!r}")
    return {
        objective_key: as_number(need(obj, objective_key, ""), objective_key),
        "lower_bound": None if lower_bound is None else as_number(lower_bound, "lower_bound"),
        "status": status,
        "solver": as_str(need(obj, "solver", ""), "solver"),
        "solve_time_s": as_number(need(obj, "solve_time_s", ""), "solve_time_s"),
    }


def check_result_claims(
    rule: str, objective_name: str, objective: float, recomputed: float,
    lower_bound: float | None, status: str, empty: bool,
) -> None:
    """The result-file rules: objective recomputed, bound below it, "optimal" only when equal."""
    if status in EMPTY_STATUSES:
        if not empty:
            raise ValidationError(rule, f"status {status!r} must come with no schedule")
        if not approx_eq(objective, 0):
            raise ValidationError(rule, f"status {status!r} must have {objective_name} 0, got {objective}")
        return
    if empty:
        raise ValidationError(rule, f"status {status!r} needs a schedule, got none")
    if not approx_eq(objective, recomputed):
        raise ValidationError(rule, f"{objective_name} is {objective} but the schedule gives {recomputed}")
    if lower_bound is not None and not approx_le(lower_bound, objective):
        raise ValidationError(rule, f"lower_bound {lower_bound} exceeds {objective_name} {objective}")
    if status == "optimal" and (lower_bound is None or not approx_eq(lower_bound, objective)):
        raise ValidationError(
            rule, f"status 'optimal' needs lower_bound == {objective_name} ({objective}), got {lower_bound}"
        )


# --------------------------------------------------------------------------------------------
# Files


def read_text(path: str | Path) -> str:
    """A file's text; errors omit the file name, which `in_file` adds."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise FormatError(f"cannot read file ({e.strerror})") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; errors omit the file name, which `in_file` adds."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def in_file(path: str | Path, parse: Callable[[], Any]) -> Any:
    """Run `parse`, prefixing a FormatError's message with the file name."""
    try:
        return parse()
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None


class JsonFile:
    """`load` / `save` for a class with `from_dict` / `to_dict`."""

    @classmethod
    def load(cls, path: str | Path) -> Any:
        return in_file(path, lambda: cls.from_dict(read_json(path)))  # type: ignore[attr-defined]

    def save(self, path: str | Path) -> None:
        write_json(self.to_dict(), path)  # type: ignore[attr-defined]
