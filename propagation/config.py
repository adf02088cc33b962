"""The config file: read with bounds, checked once, and handed out as typed values.

A config is farm-ng-core's ``EventServiceConfigList`` as JSON. It is read here with the
standard library only, so that a service refuses a bad one in milliseconds, before gRPC
and farm-ng-core load. Every problem is a ``ConfigError`` whose text names the file, the
entry, the field or the arg at fault, in one line.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import math
import os
import re
import socket
import stat
import typing
from typing import Any, Callable, Mapping, Sequence, TypeVar

__all__ = [
    "MAX_CONFIG_BYTES",
    "ROLES",
    "ConfigError",
    "Entry",
    "Subscription",
    "arg",
    "check_endpoint",
    "check_entry",
    "check_host",
    "check_port_free",
    "find_entry",
    "is_loopback",
    "parse_args",
    "read_config",
    "role_of",
    "script_role",
    "service_name_in",
]

ArgsT = TypeVar("ArgsT")

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

# Host names as gRPC resolves them: labels of 1 to 63 characters, no dot at the end.
MAX_HOST = 253
LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
# A label that reads as a number (or as hex, "0x7f"): the host is then an IPv4 address,
# which gRPC reads as four decimal numbers only.
NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
DECIMAL_BYTE = re.compile(r"0|[1-9][0-9]{0,2}")
SCOPE = re.compile(r"[A-Za-z0-9_.-]+")
# gRPC reads "unix:7010" as the unix socket "7010", whatever the case: a target that
# starts with the name of one of its resolvers is a URI of that scheme, not host:port.
GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})


class ConfigError(Exception):
    """A problem with the command line, the config file or a service's args."""


@dataclasses.dataclass(frozen=True)
class Subscription:
    """One subscription of an entry: a path of the service named in its query."""

    path: str
    query: str
    every_n: int

    @property
    def service_name(self) -> str | None:
        """The ``service_name`` of the query, if it names exactly one."""
        return service_name_in(self.query)


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
        agent = subscription.service_name
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
    check_host(f"service {entry.name!r} has host {entry.host!r}", entry.host, entry.port)


def check_host(where: str, host: str, port: int) -> None:
    """Checks that gRPC reads ``host:port`` as this host and port, and resolves it as Python does.

    Python's resolver is more lenient than gRPC's: it takes ``127.1``, ``2130706433`` and
    ``0x7f000001`` as 127.0.0.1, ``0177.0.0.1`` as 127.0.0.1 where gRPC reads 177.0.0.1,
    and ``localhost.`` with its final dot. A label that is empty (``agent..lan``) or over
    63 characters fails in Python with a ``UnicodeError``.

    Raises:
        ConfigError: ``where`` and what gRPC would make of it.

    """
    if len(host) > MAX_HOST:
        msg = f"{where}: a host name has at most {MAX_HOST} characters"
        raise ConfigError(msg)
    if ":" in host:
        address, percent, scope = host.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            msg = f"{where}: not a host name, and not an IPv6 address"
            raise ConfigError(msg) from None
        if percent and not SCOPE.fullmatch(scope):
            msg = f"{where}: an IPv6 address's scope (after %) is an interface name or number"
            raise ConfigError(msg)
        return
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    if "" in labels:
        msg = f"{where}: it has an empty label (a dot at the start or two in a row)"
        raise ConfigError(msg)
    wrong = next((label for label in labels if not LABEL.fullmatch(label)), None)
    if wrong is not None:
        msg = f"{where}: its label {wrong[:70]!r} is not 1 to 63 letters, digits, '-' or '_'"
        raise ConfigError(msg)
    if host.endswith("."):
        msg = f"{where}: gRPC does not resolve a name that ends with a dot; write {host[:-1]!r}"
        raise ConfigError(msg)
    if NUMERIC_LABEL.fullmatch(labels[-1]) and not (
        len(labels) == 4 and all(DECIMAL_BYTE.fullmatch(label) and int(label) < 256 for label in labels)
    ):
        msg = (
            f"{where}: not an IPv4 address as gRPC reads it (four numbers 0 to 255, without"
            " leading zeros, e.g. 127.0.0.1); Python reads short and hex forms, gRPC does not"
        )
        raise ConfigError(msg)
    if host.lower() in GRPC_SCHEMES:
        msg = f"{where}: gRPC reads '{host}:{port}' as a {host.lower()}: address, not as a host and port"
        raise ConfigError(msg)


# ---------------------------------------------------------------------------------
# A service's args


def arg(minimum: float, maximum: float, default: Any = dataclasses.MISSING, unit: str = "") -> Any:
    """A field of a service's args dataclass with its allowed range (and default, if optional).

    Example: ``rate: float = arg(0.01, 10_000, unit="Hz")``.
    """
    metadata = {"minimum": minimum, "maximum": maximum, "unit": unit}
    return dataclasses.field(default=default, metadata=metadata)


def parse_args(entry: Entry, args_type: type[ArgsT]) -> ArgsT:
    """Turns an entry's ``"key=value"`` args into ``args_type``, a dataclass.

    Each field's annotation (``int``, ``float``, ``bool``, ``str``) says how its value is
    parsed, and its ``arg()`` range bounds it; a field without a default is required.
    The dataclass's ``__post_init__`` may raise ``ValueError`` for rules between fields.

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


BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _parse_value(where: str, text: str, kind: type, bounds: Mapping[str, Any]) -> Any:
    if kind is bool:
        if text.lower() not in BOOLEANS:
            msg = f"{where}={text!r} is not true or false"
            raise ConfigError(msg)
        return BOOLEANS[text.lower()]
    if kind is str:
        return text
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


def check_port_free(host: str, port: int) -> None:
    """Tries the bind that gRPC will do, to name the problem in one line.

    gRPC reports a failed bind as a generic error (and a C-level log line); a plain
    socket tells why.

    Raises:
        ConfigError: the host does not resolve, is not an address of this machine, or
            the port is in use there.

    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg = f"host {host!r} does not resolve: {exc.strerror}"
        raise ConfigError(msg) from None
    except UnicodeError:  # a label that is empty or too long (check_host says which)
        msg = f"host {host!r} is not a valid host name"
        raise ConfigError(msg) from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: connections of a stopped server in TIME_WAIT must not
            # block a restart, while a live listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    msg = f"port {port} on {host} ({sockaddr[0]}) is already in use"
                elif exc.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6 and len(infos) > 1:
                    continue  # no IPv6 here: gRPC binds the IPv4 address alone
                else:
                    msg = f"cannot listen on {host}:{port} ({sockaddr[0]}): {exc.strerror}"
                raise ConfigError(msg) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback only (``localhost``, ``127.0.0.1``, ``::1``).

    A service there is reached from this machine alone: never over a thin link.
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
