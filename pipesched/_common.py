"""Shared pieces of the three problem models: errors, tolerance, typed JSON readers, result rules.

Every reader here takes the *key path* of the value it checks (``stages[3].F``) so that a bad
input is reported as one line naming the offending key, as ``shared/formats.md`` requires.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STATUSES = ("optimal", "feasible", "infeasible", "unknown")
EMPTY_STATUSES = ("infeasible", "unknown")

# Documented caps on what pipesched reads (README "Bad input"): numbers beyond 2^53 lose integer
# precision as floats, and a file beyond MAX_FILE_BYTES is no instance a solver could handle.
MAX_NUMBER = 2**53
MAX_FILE_BYTES = 256 * 2**20


class PipeschedError(Exception):
    """Base class of every error pipesched raises on purpose; `exit_code` is the CLI's exit
    status for it (2: bad input, 1: a well-formed input that fails a check)."""

    exit_code = 2


class FormatError(PipeschedError, ValueError):
    """Malformed input: wrong JSON, wrong type, missing key, out-of-range value, cycle, ...

    The message is one line: ``[file: ]key.path: what is wrong``.
    """


class ValidationError(PipeschedError):
    """A well-formed schedule that breaks a validity rule of formats.md.

    ``rule`` names the rule (``"1.2 rule 3"``), ``op`` the offending operation when there is one.
    """

    exit_code = 1

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


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 6, 4, 2


def show(value: Any) -> str:
    """A short repr of a (possibly huge) input value, for one-line error messages."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_NUMBER:
        return f"an integer of {len(str(abs(value)))} digits"
    return _SHORT.repr(value)


def _check_magnitude(value: int | float, key: str) -> None:
    if abs(value) > MAX_NUMBER:
        raise FormatError(f"{key}: must be at most {MAX_NUMBER:.3g} in magnitude (2^53), got {show(value)}")


def lazy_module_attributes(namespace: dict[str, Any], module_of: Mapping[str, str]
                           ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose names in `module_of` load from their module
    on first use (then stay in `namespace`, the package's globals), so that importing the package
    stays cheap: `__getattr__, __dir__ = lazy_module_attributes(globals(), {...})`."""
    import importlib

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(module_of[name]), name)
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", namespace))

    return __getattr__, __dir__


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
        raise FormatError(f"{key}: expected an integer, got {_type_name(value)} {show(value)}")
    _check_magnitude(value, key)
    if lo is not None and value < lo:
        raise FormatError(f"{key}: must be >= {lo}, got {value}")
    if hi is not None and value >= hi:
        raise FormatError(f"{key}: must be < {hi}, got {value}")
    return value


def as_number(value: Any, key: str, *, nonneg: bool = True) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{key}: expected a number, got {_type_name(value)} {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FormatError(f"{key}: must be finite, got {value}")
    _check_magnitude(value, key)
    if nonneg and value < 0:
        raise FormatError(f"{key}: must be >= 0, got {value}")
    return value


def as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise FormatError(f"{key}: expected true or false, got {_type_name(value)} {show(value)}")
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
        raise FormatError(f"format: expected {expected!r}, got {show(obj['format'])}")


# --------------------------------------------------------------------------------------------
# Result files (schedules, placements)


def read_result_fields(obj: Mapping[str, Any], objective_key: str) -> dict[str, Any]:
    """The fields every result file shares, type-checked."""
    lower_bound = obj.get("lower_bound")
    status = as_str(need(obj, "status", ""), "status")
    if status not in STATUSES:
        raise FormatError(f"status: must be one of {', '.join(STATUSES)}; got {show(status)}")
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
    """A regular file's UTF-8 text (a leading BOM is dropped), at most MAX_FILE_BYTES; errors
    omit the file name, which `in_file` adds."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise FormatError("cannot read file (it is a directory)")
            if not stat.S_ISREG(info.st_mode):
                raise FormatError("cannot read file (not a regular file)")
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise FormatError(f"cannot read file ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(f"file is larger than {MAX_FILE_BYTES // 2**20} MiB, the most pipesched reads")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; errors omit the file name, which `in_file` adds."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise FormatError("invalid JSON: nested too deeply (pipesched files need a few levels)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise FormatError(f"invalid JSON: {str(e).splitlines()[0]}") from None


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by it still work);
    once the block has written it, flush it to disk and `os.replace` it onto `path`.

    A reader of `path` sees the old file or the complete new one, never a truncated one, even if
    the writer is killed. On an exception the temporary file is removed and `path` is untouched.
    A target that exists and is not a regular file (`/dev/stdout`, a pipe) is written in place.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically (see `atomic_target`)."""
    with atomic_target(path) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def read_results(path: str | Path, default: Any, *, valid: Callable[[Any], bool] | None = None) -> Any:
    """The results a benchmark saved to `path` (`write_json`), to resume from; `default` (a fresh
    copy) when there is no such file.

    A file that is not valid JSON of `default`'s shape is moved aside to ``<path>.corrupt`` (then
    ``.corrupt.1``, ...), with a one-line warning on stderr, and `default` is returned, so that the
    benchmark rebuilds it: a file cut mid-write (by a writer that was not atomic), or edited by hand.
    The shape: a list default wants a list of objects (rows); a dict default an object that has
    each of default's keys with a value of the same shape (``{"rows": [], "scaling": []}``).
    `valid`, if given, checks more (the row keys the benchmark reads, say); its KeyError,
    TypeError, ... count as False. A file that cannot be read at all (a directory, no permission)
    raises OSError: that is no half-written result to set aside.
    """
    import copy
    import sys

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return copy.deepcopy(default)
    try:
        obj = json.loads(data.decode("utf-8-sig"))
        if not _results_shape(obj, default):
            problem = f"not {type(default).__name__} of results as expected"
        elif valid is not None and not _checks(valid, obj):
            problem = "results of another shape than expected"
        else:
            return obj
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        problem = f"not valid JSON ({' '.join(str(e).split())[:80]})"
    aside = path.with_name(path.name + ".corrupt")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, aside)
    print(f"warning: {path}: {problem}; moved it to {aside.name} and starting afresh", file=sys.stderr)
    return copy.deepcopy(default)


def _results_shape(obj: Any, default: Any) -> bool:
    if isinstance(default, list):
        return isinstance(obj, list) and all(isinstance(row, dict) for row in obj)
    if isinstance(default, dict):
        return isinstance(obj, dict) and all(key in obj and _results_shape(obj[key], value)
                                             for key, value in default.items())
    return obj is None if default is None else isinstance(obj, type(default))


def _checks(valid: Callable[[Any], bool], obj: Any) -> bool:
    try:
        return bool(valid(obj))
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        return False


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
