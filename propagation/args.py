"""A service's args: the ``"key=value"`` strings of its config entry, as a typed dataclass.

    @dataclasses.dataclass(frozen=True)
    class AgentArgs:
        rate: float = arg(0.01, 10_000, unit="Hz")
        num_tasks: int = arg(1, 1_000)

Each field's annotation (``int`` or ``float``) says how its value is parsed, its ``arg()``
range bounds it, and one without a default is required; the dataclass's
``__post_init__`` may raise ``ValueError`` for a rule between fields. Every problem is a
``ConfigError`` naming the service, the arg and what it takes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, TypeVar

from propagation.config import ConfigError, Entry

ArgsT = TypeVar("ArgsT")


def arg(minimum: float, maximum: float, default: Any = dataclasses.MISSING, unit: str = "") -> Any:
    """A field of a service's args dataclass with its allowed range (and default, if optional).

    Example: ``rate: float = arg(0.01, 10_000, unit="Hz")``.
    """
    metadata = {"minimum": minimum, "maximum": maximum, "unit": unit}
    return dataclasses.field(default=default, metadata=metadata)


def parse_args(entry: Entry, args_type: type[ArgsT]) -> ArgsT:
    """Turns an entry's ``"key=value"`` args into ``args_type``, a dataclass.

    Raises:
        ConfigError: an arg is malformed, unknown, repeated, missing, of the wrong type
            or out of range.

    """
    types = typing.get_type_hints(args_type)
    fields = {field.name: field for field in dataclasses.fields(args_type)}  # type: ignore[arg-type]
    where = f"service {entry.name!r}"
    values: dict[str, Any] = {}
    for text in entry.args:
        key, sep, value = (part.strip() for part in text.partition("="))
        if not sep or not key:
            msg = f"{where}: arg {text!r} is not of the form key=value"
            raise ConfigError(msg)
        if key not in fields:
            msg = f"{where}: unknown arg {key!r} (it takes: {', '.join(fields)})"
            raise ConfigError(msg)
        if key in values:
            msg = f"{where}: arg {key!r} is given twice"
            raise ConfigError(msg)
        values[key] = _parse_value(f"{where}: arg {key}", value, types[key], fields[key].metadata)
    missing = [name for name, field in fields.items() if name not in values and field.default is dataclasses.MISSING]
    if missing:
        msg = f'{where}: missing arg {missing[0]!r} (add "{missing[0]}=..." to its args)'
        raise ConfigError(msg)
    try:
        return args_type(**values)
    except ValueError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from None


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _parse_value(where: str, text: str, kind: type, bounds: Mapping[str, Any]) -> Any:
    if kind not in (int, float):
        msg = f"{where}: fields of type {kind} are not supported"
        raise TypeError(msg)
    try:
        value = kind(text)
    except ValueError:
        msg = f"{where}={text!r} is not {'a whole number' if kind is int else 'a number'}"
        raise ConfigError(msg) from None
    if not math.isfinite(value):
        msg = f"{where}={text!r} is not a finite number"
        raise ConfigError(msg)
    low, high = bounds.get("minimum"), bounds.get("maximum")
    if low is not None and high is not None and not low <= value <= high:
        msg = f"{where}={text} must be in {_number(low)}..{_number(high)}"
        raise ConfigError(msg)
    return value
