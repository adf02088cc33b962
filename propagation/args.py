"""A service's args: the ``"key=value"`` strings of its config entry, as a typed dataclass.

    @dataclasses.dataclass(frozen=True)
    class AgentArgs:
        rate: float = arg(0.01, 10_000, unit="Hz")
        num_tasks: int = arg(1, 1_000)

A field's annotation (``int`` or ``float``) says how it is parsed, its ``arg()`` range bounds
it, one without a default is required; ``__post_init__`` may raise ``ValueError`` for a rule
between fields. Every problem is a ``ConfigError`` naming the service, the arg and what it takes.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, TypeVar

from propagation.config import ConfigError, Entry, check

ArgsT = TypeVar("ArgsT")


def arg(minimum: float, maximum: float, default: Any = dataclasses.MISSING, unit: str = "") -> Any:
    """A field of a service's args dataclass with its allowed range (and default, if optional)."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "maximum": maximum, "unit": unit})


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
        check(sep != "" and key != "", f"{where}: arg {text!r} is not of the form key=value")
        check(key in fields, f"{where}: unknown arg {key!r} (it takes: {', '.join(fields)})")
        check(key not in values, f"{where}: arg {key!r} is given twice")
        kind, arg_where = types[key], f"{where}: arg {key}"
        if kind not in (int, float):
            msg = f"{arg_where}: fields of type {kind} are not supported"
            raise TypeError(msg)
        try:
            number = kind(value)
        except ValueError:
            msg = f"{arg_where}={value!r} is not {'a whole number' if kind is int else 'a number'}"
            raise ConfigError(msg) from None
        check(math.isfinite(number), f"{arg_where}={value!r} is not a finite number")
        low, high = fields[key].metadata.get("minimum"), fields[key].metadata.get("maximum")
        check(low is None or high is None or low <= number <= high, f"{arg_where}={value} must be in {low}..{high}")
        values[key] = number
    required = (name for name, field in fields.items() if field.default is dataclasses.MISSING)
    missing = next((name for name in required if name not in values), None)
    check(missing is None, f'{where}: missing arg {missing!r} (add "{missing}=..." to its args)')
    try:
        return args_type(**values)
    except ValueError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from None
