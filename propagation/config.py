"""The config file: read with bounds, checked once, and handed out as typed values.

A config is farm-ng-core's ``EventServiceConfigList`` as JSON. It is read here with the
standard library only, so that a service refuses a bad one in milliseconds, before gRPC
and farm-ng-core load. Every problem is a ``ConfigError`` whose text names the file, the
entry, the field or the arg at fault, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from typing import Any, Callable, Mapping, Sequence

from propagation.network import check_host

# A config of this example is about 1 kB; these bounds leave room for big systems and
# keep a wrong file (a log, an image, /dev/zero) from being read or parsed for long.
MAX_CONFIG_BYTES = 256 * 1024
MAX_DEPTH = 8
MAX_ENTRIES = 100
MAX_LIST = 64  # args or subscriptions of one entry
MAX_TEXT = 256  # characters in a name, host, path, query or arg
MAX_NUMBER_DIGITS = 20
# A subscription hears every n-th event: at an agent's top rate (10,000 a second) every
# 1,000th is still ten a second. 0 and 1 both mean every event.
MAX_EVERY_N = 1000

# The roles of this example; an entry's name starts with its role ("agent-1").
ROLES = ("storage", "supervisor", "agent")

# Names travel in URI queries ("service_name=agent-1"): "=", "&", "?" or a space would
# break them there.
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


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One subscription of an entry: a path of the service named in its query."""

    path: str
    query: str
    every_n: int


def service_name_in(query: str) -> str | None:
    """The ``service_name`` a URI query (``service_name=agent-1``) names, if exactly one."""
    pairs = (part.partition("=") for part in query.split("&"))
    names = [value for key, _, value in pairs if key == "service_name"]
    return names[0] if len(names) == 1 else None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of the config, checked: what a service of this example reads of it."""

    name: str
    host: str
    port: int  # 0 when the entry has none (a recorder's subscription list, say)
    log_level: int  # as in the logging module; 0 when unset
    args: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    # The entry as it was in the file, for farm-ng-core's own parser.
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def role(self) -> str | None:
        """``agent``, ``supervisor`` or ``storage``; None for an entry of another program."""
        return role_of(self)

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
    """The role of an entry, by its name's prefix in any case; None if it has no port or no role.

    The one rule for which script runs an entry (``storage-2`` and ``Storage`` run under
    storage.py). A config may hold entries of other programs (a recorder, say): they are
    not ours.
    """
    if not entry.port:
        return None
    name = entry.name.lower()
    return next((role for role in ROLES if name.startswith(role)), None)


def script_role(script: str) -> str | None:
    """The role a script runs (``agent.py`` runs agents); None for another program."""
    name = os.path.basename(script)
    return next((role for role in ROLES if name == f"{role}.py"), None)


# ---------------------------------------------------------------------------------
# Reading the file


def read_config(path: str) -> list[Entry]:
    """Reads a config file: a regular file of at most ``MAX_CONFIG_BYTES``, checked.

    Raises:
        ConfigError: the file is missing, unreadable, not a regular file, too big, not
            JSON, or not an ``EventServiceConfigList`` this example can run.

    """
    data = _parse_json(path, _read_bounded(path))
    where = f"config file {path}"
    if not isinstance(data, dict) or set(data) - {"configs"} or not isinstance(data.get("configs", []), list):
        msg = f'{where} is not an EventServiceConfigList: it must be {{"configs": [...]}}'
        raise ConfigError(msg)
    raw_entries = data.get("configs", [])
    if len(raw_entries) > MAX_ENTRIES:
        msg = f"{where} has {len(raw_entries)} entries; at most {MAX_ENTRIES} are read"
        raise ConfigError(msg)
    entries = [_entry(where, index, raw) for index, raw in enumerate(raw_entries)]
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            msg = f"{where} has two entries named {entry.name!r}"
            raise ConfigError(msg)
        seen.add(entry.name)
    return entries


def _read_bounded(path: str) -> bytes:
    try:
        # Non-blocking: opening a FIFO must not wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        msg = f"config file {path} does not exist"
        raise ConfigError(msg) from None
    except OSError as exc:
        msg = f"cannot read config file {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            msg = f"cannot read config file {path}: it is {kind}"
            raise ConfigError(msg)
        data = os.read(descriptor, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        msg = f"cannot read config file {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_CONFIG_BYTES:
        msg = f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB: is it the right file?"
        raise ConfigError(msg)
    return data


def _bounded_number(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_DIGITS:
            msg = f"a number of {len(text)} characters"
            raise ValueError(msg)
        return convert(text)

    return parse


def _refuse_constant(name: str) -> Any:
    msg = f"{name} is not a JSON number"
    raise ValueError(msg)


def _parse_json(path: str, data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        msg = f"config file {path} is not UTF-8 text"
        raise ConfigError(msg) from None
    try:
        parsed = json.loads(
            text,
            parse_int=_bounded_number(int),
            parse_float=_bounded_number(float),
            parse_constant=_refuse_constant,
        )
    except json.JSONDecodeError as exc:
        msg = f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ConfigError(msg) from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "nesting too deep"
        msg = f"config file {path} is not valid JSON for a config: {reason}"
        raise ConfigError(msg) from None
    if _depth(parsed) > MAX_DEPTH:
        msg = f"config file {path} nests deeper than {MAX_DEPTH} levels: it is not a config"
        raise ConfigError(msg)
    return parsed


def _depth(value: Any) -> int:
    # Without recursion: a file of a few kilobytes can nest thousands of levels.
    deepest = 0
    pending = [(value, 1)]  # a value, and its depth if it is a list or an object
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest


# ---------------------------------------------------------------------------------
# Checking the entries


def _entry(where: str, index: int, raw: Any) -> Entry:
    if not isinstance(raw, dict):
        msg = f"{where}: entry {index + 1} is not an object"
        raise ConfigError(msg)
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_TEXT:
        msg = (
            f"{where}: entry {index + 1} has name {name!r}; a name is letters, digits, '_', '.' or '-'"
            f" (it travels in URI queries), starting with a letter or digit"
        )
        raise ConfigError(msg)
    where = f"service {name!r}"
    unknown = sorted(set(raw) - ENTRY_FIELDS)
    if unknown:
        msg = f"{where}: unknown field {unknown[0]!r} (an entry has: name, port, host, log_level, args, subscriptions)"
        raise ConfigError(msg)
    _one_spelling(where, raw)
    port = _integer(where, "port", raw.get("port", 0))
    if not 0 <= port < 65536:
        msg = f"{where} has port {port} in the config; it needs one in 1..65535"
        raise ConfigError(msg)
    host = raw.get("host", "")
    if not isinstance(host, str) or len(host) > MAX_TEXT or (host and not HOST.fullmatch(host)):
        msg = f"{where} has host {host!r}: not a host name or address"
        raise ConfigError(msg)
    _uris(where, raw.get("uris", []))
    return Entry(
        name=name,
        host=host,
        port=port,
        log_level=_log_level(where, raw.get("log_level", raw.get("logLevel", 0))),
        args=tuple(_texts(where, "args", raw.get("args", []))),
        subscriptions=tuple(_subscriptions(where, raw.get("subscriptions", []))),
        raw=raw,
    )


def _one_spelling(where: str, raw: Mapping[str, Any]) -> None:
    for name, other in SPELLINGS.items():
        if name in raw and other in raw:
            msg = f"{where} gives {name} twice, as {name!r} and as {other!r}: keep one"
            raise ConfigError(msg)


def _integer(where: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{where}: {field} {value!r} is not a whole number"
        raise ConfigError(msg)
    return value


def _log_level(where: str, value: Any) -> int:
    # As farm-ng-core reads it: a LogLevel name, in capitals, or its number.
    if isinstance(value, str) and value in LOG_LEVELS:
        return LOG_LEVELS[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in LOG_LEVELS.values():
        return value
    msg = f"{where}: log_level {value!r} is not one of {', '.join(LOG_LEVELS)}"
    raise ConfigError(msg)


def _texts(where: str, field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        msg = f'{where}: {field} must be a list of strings, e.g. ["key=value"]'
        raise ConfigError(msg)
    if len(value) > MAX_LIST or any(len(item) > MAX_TEXT for item in value):
        msg = f"{where}: {field} holds more than {MAX_LIST} items or an item longer than {MAX_TEXT} characters"
        raise ConfigError(msg)
    return value


def _subscriptions(where: str, value: Any) -> list[Subscription]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        msg = f"{where}: subscriptions must be a list of at most {MAX_LIST}"
        raise ConfigError(msg)
    found = []
    for raw in value:
        uri = raw.get("uri") if isinstance(raw, dict) else None
        if isinstance(uri, str):
            # The form of farm-ng's documentation, which farm-ng-core cannot parse.
            msg = (
                f'{where}: subscription "uri": {uri!r} must be an object: {{"path": ..., "query": "service_name=..."}}'
            )
            raise ConfigError(msg)
        if not isinstance(uri, dict) or set(raw) - SUBSCRIPTION_FIELDS:
            msg = f'{where}: a subscription must be {{"uri": {{"path": ..., "query": ...}}, "every_n": 1}}'
            raise ConfigError(msg)
        _one_spelling(f"{where}: a subscription", raw)
        _uri(where, "a subscription's uri", uri)
        path, query = uri.get("path", ""), uri.get("query", "")
        every_n = _integer(where, "every_n", raw.get("every_n", raw.get("everyN", 0)))
        if not 0 <= every_n <= MAX_EVERY_N:
            msg = f"{where}: every_n {every_n} must be in 0..{MAX_EVERY_N} (0 and 1: every event)"
            raise ConfigError(msg)
        found.append(Subscription(path, query, every_n))
    return found


def _uri(where: str, what: str, uri: Any) -> None:
    """Checks a URI object as farm-ng-core's ``Uri`` reads it: string fields it knows."""
    if not isinstance(uri, dict) or set(uri) - URI_FIELDS:
        msg = f"{where}: {what} must be an object with {', '.join(sorted(URI_FIELDS))}"
        raise ConfigError(msg)
    if not all(isinstance(text, str) and len(text) <= MAX_TEXT for text in uri.values()):
        msg = f"{where}: {what} holds a field that is not a string of at most {MAX_TEXT} characters"
        raise ConfigError(msg)


def _uris(where: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        msg = f"{where}: uris must be a list of at most {MAX_LIST}"
        raise ConfigError(msg)
    for uri in value:
        _uri(where, "each of uris", uri)


def find_entry(entries: Sequence[Entry], name: str, path: str = "the config") -> Entry:
    """Returns the entry called ``name``.

    Raises:
        ConfigError: no entry has that name.

    """
    for entry in entries:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in entries) or "none"
    msg = f"service {name!r} is not in {path} (it has: {known})"
    raise ConfigError(msg)


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
    if role is not None and entry.role not in (None, role):
        article = "an" if entry.role == "agent" else "a"
        msg = (
            f"service {entry.name!r} is {article} {entry.role} (its name says so):"
            f" run it with {entry.role}.py, not {role}.py"
        )
        raise ConfigError(msg)
    check_endpoint(entry)
    if (role or entry.role) != "supervisor":
        return
    for subscription in entry.subscriptions:
        agent = service_name_in(subscription.query)
        where = f"service {entry.name!r}: subscription {subscription.path}?{subscription.query}"
        if subscription.path != "/sample" or agent is None:
            msg = f"{where} must be /sample with service_name=<agent>"
            raise ConfigError(msg)
        try:
            peer = find_entry(entries, agent)
        except ConfigError as exc:
            msg = f"{where}: {exc}"
            raise ConfigError(msg) from None
        if peer.role != "agent":
            msg = f"{where}: {agent!r} is not an agent (an agent's name starts with 'agent' and it has a port)"
            raise ConfigError(msg)
        check_endpoint(peer)
    check_endpoint(find_entry(entries, "storage"))


def check_endpoint(entry: Entry) -> None:
    """Checks that an entry says where its service listens, as gRPC will read it.

    Raises:
        ConfigError: the host is empty or not one gRPC reads as host, or the port is not
            in 1..65535.

    """
    if not entry.host:
        msg = f"service {entry.name!r} has no host in the config"
        raise ConfigError(msg)
    if not 0 < entry.port < 65536:
        msg = f"service {entry.name!r} has port {entry.port} in the config; it needs one in 1..65535"
        raise ConfigError(msg)
    try:
        check_host(f"service {entry.name!r} has host {entry.host!r}", entry.host, entry.port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
