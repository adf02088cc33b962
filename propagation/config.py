"""The config file, farm-ng-core's ``EventServiceConfigList`` as JSON: read with bounds, checked once, typed.

Standard library only: a bad file is refused in milliseconds, before gRPC and farm-ng-core
load, with a ``ConfigError`` of one line naming the file, entry, field or arg at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from typing import Any, Mapping, Sequence

from propagation.network import host_problem

# A config of this example is about 1 kB: room for big systems, while a wrong file (a log,
# an image, /dev/zero) is not read or parsed for long.
MAX_CONFIG_BYTES = 256 * 1024
MAX_DEPTH = 8
MAX_ENTRIES = 100
MAX_LIST = 64  # args or subscriptions of one entry
MAX_TEXT = 256  # characters in a name, host, path, query or arg
MAX_NUMBER_DIGITS = 20
# A subscription hears every n-th event: at an agent's top rate (10,000 a second) every
# 1,000th is still ten a second. 0 and 1 both mean every event.
MAX_EVERY_N = 1000

ROLES = ("storage", "supervisor", "agent")  # an entry's name starts with its role ("agent-1")

# Names travel in URI queries ("service_name=agent-1"), which "=", "&", "?" or a space break.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
HOST = re.compile(r"[A-Za-z0-9_.:%-]+")
LOG_LEVELS = {"NOTSET": 0, "DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50, "FATAL": 50}

ENTRY_FIELDS = frozenset({"name", "port", "host", "subscriptions", "uris", "args", "log_level", "logLevel"})
SUBSCRIPTION_FIELDS = frozenset({"uri", "every_n", "everyN"})
URI_FIELDS = frozenset({"scheme", "authority", "path", "query"})
# protobuf's ParseDict takes a field by either name; given both, it runs with the later.
SPELLINGS = {"log_level": "logLevel", "every_n": "everyN"}


class ConfigError(Exception):
    """A problem with the command line, the config file or a service's args."""


def check(condition: bool, problem: str) -> None:
    """Raises a ``ConfigError`` saying ``problem`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(problem)


def service_name_in(query: str) -> str | None:
    """The ``service_name`` a URI query (``service_name=agent-1``) names, if exactly one."""
    names = [value for key, _, value in (part.partition("=") for part in query.split("&")) if key == "service_name"]
    return names[0] if len(names) == 1 else None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the config, checked: what a service of this example reads of it."""

    name: str
    host: str
    port: int  # 0 when the entry has none (a recorder's subscription list, say)
    log_level: int  # as in the logging module; 0 when unset
    args: tuple[str, ...]
    # The entry as it was in the file, for farm-ng-core's own parser (and its subscriptions).
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    def service_config(self) -> Any:
        """The entry as farm-ng-core's ``EventServiceConfig`` (what its clients and services take)."""
        # Imported here: this module loads before them, to check input quickly.
        from farm_ng.core.event_service_pb2 import EventServiceConfig  # noqa: PLC0415
        from google.protobuf import json_format  # noqa: PLC0415

        try:
            return json_format.ParseDict(self.raw, EventServiceConfig())
        except json_format.ParseError as exc:  # the checks above should have said why first
            msg = f"service {self.name!r}: {' '.join(str(exc).split())}"
            raise ConfigError(msg) from None


def role_of(entry: Entry) -> str | None:
    """The role of an entry by its name's prefix, in any case: the one rule for which script runs it.

    ``Storage-2`` runs under storage.py; None without a port or a role (a recorder's entry, say).
    """
    return next((role for role in ROLES if entry.port and entry.name.lower().startswith(role)), None)


def script_role(script: str) -> str | None:
    """The role a script runs (``agent.py`` runs agents); None for another program."""
    return next((role for role in ROLES if os.path.basename(script) == f"{role}.py"), None)


def read_config(path: str) -> list[Entry]:
    """Reads a config file: a regular file of at most ``MAX_CONFIG_BYTES``, checked.

    Raises:
        ConfigError: the file is missing, unreadable, not a regular file, too big, not
            JSON, or not an ``EventServiceConfigList`` this example can run.

    """
    data = _read_json(path)
    where = f"config file {path}"
    check(
        isinstance(data, dict) and not set(data) - {"configs"} and isinstance(data.get("configs", []), list),
        f'{where} is not an EventServiceConfigList: it must be {{"configs": [...]}}',
    )
    raw_entries = data.get("configs", [])
    check(len(raw_entries) <= MAX_ENTRIES, f"{where} has {len(raw_entries)} entries; at most {MAX_ENTRIES} are read")
    entries = [_entry(where, index, raw) for index, raw in enumerate(raw_entries)]
    names = [entry.name for entry in entries]
    twice = next((name for index, name in enumerate(names) if name in names[:index]), None)
    check(twice is None, f"{where} has two entries named {twice!r}")
    return entries


def _read_json(path: str) -> Any:
    where = f"config file {path}"
    try:
        # Non-blocking: opening a FIFO must not wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(descriptor).st_mode
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            check(stat.S_ISREG(mode), f"cannot read config file {path}: it is {kind}")
            data = os.read(descriptor, MAX_CONFIG_BYTES + 1)
        finally:
            os.close(descriptor)
    except FileNotFoundError:
        msg = f"{where} does not exist"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"cannot read config file {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    check(
        len(data) <= MAX_CONFIG_BYTES, f"{where} is larger than {MAX_CONFIG_BYTES // 1024} KiB: is it the right file?"
    )
    try:
        parsed = json.loads(data.decode("utf-8"), parse_int=_number, parse_float=_number, parse_constant=_number)
    except UnicodeDecodeError:
        msg = f"{where} is not UTF-8 text"
        raise ConfigError(msg) from None
    except json.JSONDecodeError as exc:
        msg = f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ConfigError(msg) from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "nesting too deep"
        msg = f"{where} is not valid JSON for a config: {reason}"
        raise ConfigError(msg) from None
    check(not _nests_deeper(parsed, MAX_DEPTH), f"{where} nests deeper than {MAX_DEPTH} levels: it is not a config")
    return parsed


def _number(text: str) -> float:
    """A number as the json module reads it, unless it is long, or Python's NaN or Infinity."""
    constant = text in ("NaN", "Infinity", "-Infinity")
    if constant or len(text) > MAX_NUMBER_DIGITS:
        msg = f"{text} is not a JSON number" if constant else f"a number of {len(text)} characters"
        raise ValueError(msg)
    return float(text) if any(mark in text for mark in ".eE") else int(text)


def _nests_deeper(value: Any, levels: int) -> bool:
    """Whether lists and objects nest in ``value`` deeper than ``levels``; recursion stops there."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return children is not None and (levels == 0 or any(_nests_deeper(child, levels - 1) for child in children))


def _entry(where: str, index: int, raw: Any) -> Entry:
    check(isinstance(raw, dict), f"{where}: entry {index + 1} is not an object")
    name = raw.get("name")
    check(
        isinstance(name, str) and NAME.fullmatch(name) is not None and len(name) <= MAX_TEXT,
        f"{where}: entry {index + 1} has name {name!r}; a name is letters, digits, '_', '.' or '-'"
        " (it travels in URI queries), starting with a letter or digit",
    )
    where = f"service {name!r}"
    unknown = sorted(set(raw) - ENTRY_FIELDS)
    if unknown:
        msg = f"{where}: unknown field {unknown[0]!r} (an entry has: name, port, host, log_level, args, subscriptions)"
        raise ConfigError(msg)
    _one_spelling(where, raw)
    port = _integer(where, "port", raw.get("port", 0))
    check(0 <= port < 65536, f"{where} has port {port} in the config; it needs one in 1..65535")
    host = raw.get("host", "")
    check(
        isinstance(host, str) and len(host) <= MAX_TEXT and (not host or HOST.fullmatch(host) is not None),
        f"{where} has host {host!r}: not a host name or address",
    )
    for uri in _bounded_list(where, "uris", raw.get("uris", [])):
        _uri(where, "each of uris", uri)
    # As farm-ng-core reads it: a LogLevel name, in capitals, or its number.
    level = raw.get("log_level", raw.get("logLevel", 0))
    log_level = LOG_LEVELS.get(level) if isinstance(level, str) else level
    known = isinstance(log_level, int) and not isinstance(log_level, bool) and log_level in LOG_LEVELS.values()
    check(known, f"{where}: log_level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    args = raw.get("args", [])
    check(
        isinstance(args, list) and all(isinstance(item, str) for item in args),
        f'{where}: args must be a list of strings, e.g. ["key=value"]',
    )
    check(
        len(args) <= MAX_LIST and all(len(item) <= MAX_TEXT for item in args),
        f"{where}: args holds more than {MAX_LIST} items or an item longer than {MAX_TEXT} characters",
    )
    for subscription in _bounded_list(where, "subscriptions", raw.get("subscriptions", [])):
        uri = subscription.get("uri") if isinstance(subscription, dict) else None
        # A string is the form of farm-ng's documentation, which farm-ng-core cannot parse.
        check(
            not isinstance(uri, str),
            f'{where}: subscription "uri": {uri!r} must be an object: {{"path": ..., "query": "service_name=..."}}',
        )
        check(
            isinstance(uri, dict) and not set(subscription) - SUBSCRIPTION_FIELDS,
            f'{where}: a subscription must be {{"uri": {{"path": ..., "query": ...}}, "every_n": 1}}',
        )
        _one_spelling(f"{where}: a subscription", subscription)
        _uri(where, "a subscription's uri", uri)
        every_n = _integer(where, "every_n", subscription.get("every_n", subscription.get("everyN", 0)))
        check(
            0 <= every_n <= MAX_EVERY_N,
            f"{where}: every_n {every_n} must be in 0..{MAX_EVERY_N} (0 and 1: every event)",
        )
    return Entry(name, host, port, log_level, tuple(args), raw)


def _one_spelling(where: str, raw: Mapping[str, Any]) -> None:
    for name, other in SPELLINGS.items():
        check(not {name, other} <= raw.keys(), f"{where} gives {name} twice, as {name!r} and as {other!r}: keep one")


def _integer(where: str, field: str, value: Any) -> int:
    check(isinstance(value, int) and not isinstance(value, bool), f"{where}: {field} {value!r} is not a whole number")
    return value


def _bounded_list(where: str, field: str, value: Any) -> list[Any]:
    check(isinstance(value, list) and len(value) <= MAX_LIST, f"{where}: {field} must be a list of at most {MAX_LIST}")
    return value


def _uri(where: str, what: str, uri: Any) -> None:
    # As farm-ng-core's Uri reads it: string fields it knows.
    check(
        isinstance(uri, dict) and not set(uri) - URI_FIELDS,
        f"{where}: {what} must be an object with {', '.join(sorted(URI_FIELDS))}",
    )
    check(
        all(isinstance(text, str) and len(text) <= MAX_TEXT for text in uri.values()),
        f"{where}: {what} holds a field that is not a string of at most {MAX_TEXT} characters",
    )


def find_entry(entries: Sequence[Entry], name: str, path: str = "the config") -> Entry:
    """Returns the entry called ``name``.

    Raises:
        ConfigError: no entry has that name.

    """
    found = [entry for entry in entries if entry.name == name]
    known = ", ".join(entry.name for entry in entries) or "none"
    check(found != [], f"service {name!r} is not in {path} (it has: {known})")
    return found[0]


def check_entry(entry: Entry, entries: Sequence[Entry], role: str | None = None) -> None:
    """Checks that an entry can run as a service of ``role``, with the peers it needs.

    ``role`` is the role of the script that runs it (``script_role``); an entry whose name
    says another role is refused, naming the script that runs it. Without ``role``, the
    entry's own. The entry must say where it listens; a supervisor's subscriptions must
    be ``/sample`` of agents of the config, and the config must have a ``storage``: each
    of those peers must say where it listens too.

    Raises:
        ConfigError: naming what is missing or wrong.

    """
    own = role_of(entry)
    article = "an" if own == "agent" else "a"
    check(
        role is None or own in (None, role),
        f"service {entry.name!r} is {article} {own} (its name says so): run it with {own}.py, not {role}.py",
    )
    check_endpoint(entry)
    if (role or own) != "supervisor":
        return
    for subscription in entry.raw.get("subscriptions", []):
        path, query = subscription["uri"].get("path", ""), subscription["uri"].get("query", "")
        agent = service_name_in(query)
        where = f"service {entry.name!r}: subscription {path}?{query}"
        check(path == "/sample" and agent is not None, f"{where} must be /sample with service_name=<agent>")
        try:
            peer = find_entry(entries, agent)
        except ConfigError as exc:
            msg = f"{where}: {exc}"
            raise ConfigError(msg) from None
        check(
            role_of(peer) == "agent",
            f"{where}: {agent!r} is not an agent (an agent's name starts with 'agent' and it has a port)",
        )
        check_endpoint(peer)
    check_endpoint(find_entry(entries, "storage"))


def check_endpoint(entry: Entry) -> None:
    """Checks that an entry says where its service listens, as gRPC will read it.

    Raises:
        ConfigError: the host is empty or not one gRPC reads as host, or the port is not
            in 1..65535.

    """
    where = f"service {entry.name!r}"
    check(entry.host != "", f"{where} has no host in the config")
    check(0 < entry.port < 65536, f"{where} has port {entry.port} in the config; it needs one in 1..65535")
    problem = host_problem(entry.host, entry.port)
    check(problem is None, f"{where} has host {entry.host!r}: {problem}")
