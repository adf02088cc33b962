"""Configs for tests: service_config.json on free ports, with changes, and its entries read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pytest

from propagation.config import find_entry, read_config
from tools import processes
from tools.processes import ROOT

if TYPE_CHECKING:
    from farm_ng.core.event_service_pb2 import EventServiceConfig


def free_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """``count`` different ports of this test worker's share that nothing listens on now (``tools.processes``)."""
    try:
        return processes.free_ports(count, taken)
    except OSError as exc:
        pytest.fail(str(exc))


def write_config(directory: Path, changes: dict[str, dict[str, Any]] | None = None, name: str = "config.json") -> Path:
    """A copy of service_config.json with free ports and ``changes`` per entry.

    ``changes`` maps a service name to fields to replace (``{"storage": {"args":
    [...]}}``); a value of None removes the entry; a name not in service_config.json
    adds one.
    """
    configs = json.loads((ROOT / "service_config.json").read_text())["configs"]
    changes = changes or {}
    ports = free_ports(len(configs) + len(changes))
    result = []
    for original in configs:
        entry = dict(original, port=ports.pop())
        if entry["name"] in changes:
            if changes[entry["name"]] is None:
                continue
            entry.update(changes[entry["name"]])
        result.append(entry)
    for name_, extra in changes.items():
        if extra is not None and name_ not in {entry["name"] for entry in configs}:
            result.append(dict({"name": name_, "host": "localhost", "port": ports.pop()}, **extra))
    path = directory / name
    path.write_text(json.dumps({"configs": result}, indent=2))
    return path


def port_of(config: Path, name: str) -> int:
    """The port of one entry of a config file."""
    return next(entry["port"] for entry in json.loads(config.read_text())["configs"] if entry["name"] == name)


def service_config(config: Path, name: str) -> EventServiceConfig:
    """One entry of a config file, as farm-ng-core's clients and services take it."""
    return find_entry(read_config(str(config)), name).service_config()
