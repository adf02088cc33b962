"""The config file and a service's args, in-process: every problem is one line that names it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent import AgentArgs
from propagation.args import parse_args
from propagation.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    Entry,
    check_endpoint,
    check_entry,
    find_entry,
    read_config,
    role_of,
    script_role,
    service_name_in,
)
from propagation.network import is_loopback
from storage import StorageArgs
from supervisor import SupervisorArgs

ROOT = Path(__file__).resolve().parent.parent


def entries_of(tmp_path: Path, configs: Any) -> list[Entry]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"configs": configs}))
    return read_config(str(path))


def refused(tmp_path: Path, text: str | bytes) -> str:
    """The one-line problem a config file's content gives."""
    path = tmp_path / "config.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as caught:
        read_config(str(path))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_shipped_config_reads() -> None:
    entries = read_config(str(ROOT / "service_config.json"))
    names = [entry.name for entry in entries]
    assert names == ["agent-1", "agent-2", "agent-3", "supervisor-1", "supervisor-2", "storage"]
    for entry in entries:
        check_entry(entry, entries)
    supervisor = find_entry(entries, "supervisor-1")
    subscriptions = supervisor.service_config().subscriptions
    assert [service_name_in(subscription.uri.query) for subscription in subscriptions] == ["agent-1", "agent-2"]
    assert supervisor.service_config().subscriptions[0].uri.query == "service_name=agent-1"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"configs": [ {"name": "agent-1",, } ]}', "is not valid JSON: Expecting property name"),
        ('{"services": []}', "is not an EventServiceConfigList"),
        ("[1, 2]", "is not an EventServiceConfigList"),
        ('{"configs": [{"name": "a", "port": ' + "9" * 40 + "}]}", "a number of 40 characters"),
        ('{"configs": [{"name": "a", "port": NaN}]}', "NaN is not a JSON number"),
        ('{"configs": [' + "[" * 50 + "]" * 50 + "]}", "nests deeper than 8 levels"),
        ('{"configs": [' + "[" * 900 + "]" * 900 + "]}", "nests deeper than 8 levels"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (" " * (MAX_CONFIG_BYTES + 1), "is larger than 256 KiB"),
    ],
)
def test_a_file_that_is_not_a_config(tmp_path: Path, content: str | bytes, expected: str) -> None:
    message = refused(tmp_path, content)
    assert str(tmp_path / "config.json") in message
    assert expected in message


def test_missing_file_directory_and_fifo(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_config(str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"cannot read config file .*: it is a directory"):
        read_config(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it must not wait for a writer
    with pytest.raises(ConfigError, match="it is not a regular file"):
        read_config(str(fifo))
    with pytest.raises(ConfigError, match="it is not a regular file"):
        read_config("/dev/zero")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": ""}, "has name ''"),
        ({"name": "agent=1"}, "has name 'agent=1'"),
        ({"name": "agent&1"}, "has name 'agent&1'"),
        ({"name": "a b"}, "has name 'a b'"),
        ({"name": 5}, "has name 5"),
        ({"name": "agent-1", "port": 70000}, "port 70000"),
        ({"name": "agent-1", "port": "5001"}, "port '5001' is not a whole number"),
        ({"name": "agent-1", "host": "a host"}, "host 'a host'"),
        ({"name": "agent-1", "log_level": "LOUD"}, "log_level 'LOUD'"),
        ({"name": "agent-1", "log_level": "info"}, "log_level 'info'"),  # farm-ng-core reads capitals only
        ({"name": "agent-1", "uris": "x"}, "uris must be a list"),
        ({"name": "agent-1", "uris": [{"path": 5}]}, "each of uris holds a field that is not a string"),
        (
            {"name": "supervisor-1", "subscriptions": [{"uri": {"path": "/sample", "scheme": 5}}]},
            "a subscription's uri holds a field that is not a string",
        ),
        ({"name": "agent-1", "args": "rate=5"}, "args must be a list of strings"),
        ({"name": "agent-1", "args": ["x"] * 65}, "more than 64 items"),
        ({"name": "agent-1", "speed": 3}, "unknown field 'speed'"),
        (
            {"name": "supervisor-1", "subscriptions": [{"uri": "event://supervisor-1/sample?service=agent-1"}]},
            "must be an object",
        ),
    ],
)
def test_a_bad_entry(tmp_path: Path, entry: dict[str, Any], expected: str) -> None:
    assert expected in refused(tmp_path, json.dumps({"configs": [entry]}))


def test_names_are_unique(tmp_path: Path) -> None:
    assert "two entries named 'agent-1'" in refused(tmp_path, json.dumps({"configs": [{"name": "agent-1"}] * 2}))


def supervisor_with(subscriptions: list[dict[str, Any]], storage: bool = True) -> list[dict[str, Any]]:
    configs = [
        {"name": "agent-1", "host": "localhost", "port": 5001},
        {"name": "supervisor-1", "host": "localhost", "port": 7001, "subscriptions": subscriptions},
    ]
    return [*configs, {"name": "storage", "host": "localhost", "port": 7010}] if storage else configs


def subscription(path: str, query: str) -> dict[str, Any]:
    return {"uri": {"path": path, "query": query}, "every_n": 1}


@pytest.mark.parametrize(
    ("subscriptions", "storage", "expected"),
    [
        ([subscription("/sample", "service_name=agent-7")], True, "'agent-7' is not in"),
        ([subscription("/health", "service_name=agent-1")], True, "must be /sample"),
        ([subscription("/sample", "service_name=storage")], True, "'storage' is not an agent"),
        ([subscription("/sample", "service_name=supervisor-1")], True, "'supervisor-1' is not an agent"),
        ([subscription("/sample", "")], True, "must be /sample with service_name=<agent>"),
        ([subscription("/sample", "service_name=agent-1")], False, "'storage' is not in"),
    ],
)
def test_a_supervisor_needs_agents_and_storage(
    tmp_path: Path, subscriptions: list[dict[str, Any]], storage: bool, expected: str
) -> None:
    entries = entries_of(tmp_path, supervisor_with(subscriptions, storage))
    with pytest.raises(ConfigError, match=expected):
        check_entry(find_entry(entries, "supervisor-1"), entries)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "agent-1", "log_level": "INFO", "logLevel": "DEBUG"}, "gives log_level twice"),
        ({"name": "agent-1", "log_level": "INFO", "logLevel": "LOUD"}, "gives log_level twice"),
        (
            {"name": "supervisor-1", "subscriptions": [{"uri": {"path": "/sample"}, "every_n": 1, "everyN": 5}]},
            "a subscription gives every_n twice, as 'every_n' and as 'everyN'",
        ),
        ({"name": "supervisor-1", "subscriptions": [dict(subscription("/sample", ""), every_n=2**32 - 1)]}, "0..1000"),
        ({"name": "supervisor-1", "subscriptions": [{"uri": {"path": "/sample"}, "everyN": 1001}]}, "every_n 1001"),
    ],
)
def test_a_field_read_two_ways_or_out_of_range(tmp_path: Path, entry: dict[str, Any], expected: str) -> None:
    # protobuf's ParseDict takes both spellings and runs with the later: checked with one,
    # run with the other. every_n of 2^32-1 would hear one sample ever.
    assert expected in refused(tmp_path, json.dumps({"configs": [entry]}))


def endpoint(host: str, name: str = "agent-1", port: int = 5001) -> Entry:
    return Entry(name=name, host=host, port=port, log_level=0, args=(), raw={})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("agent..lan", "an empty label"),
        (".", "an empty label"),
        (".lan", "an empty label"),
        ("a" * 64 + ".lan", "is not 1 to 63 letters"),
        ("a" * 250 + ".lan", "at most 253 characters"),
        ("agent%1", "its label 'agent%1' is not"),
        ("localhost.", "gRPC does not resolve a name that ends with a dot; write 'localhost'"),
        ("127.1", "not an IPv4 address as gRPC reads it"),
        ("0", "not an IPv4 address as gRPC reads it"),
        ("2130706433", "not an IPv4 address as gRPC reads it"),
        ("0x7f000001", "not an IPv4 address as gRPC reads it"),
        ("0177.0.0.1", "not an IPv4 address as gRPC reads it"),  # gRPC: 177.0.0.1, Python: 127.0.0.1
        ("127.0.0.256", "not an IPv4 address as gRPC reads it"),
        ("unix", "gRPC reads 'unix:5001' as a unix: address"),
        ("UNIX", "gRPC reads 'UNIX:5001' as a unix: address"),
        ("dns", "as a dns: address"),
        ("unix-abstract", "as a unix-abstract: address"),
        ("::g", "not an IPv6 address"),
        ("fe80::1%", "an IPv6 address's scope"),
    ],
)
def test_a_host_as_grpc_reads_it(host: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_endpoint(endpoint(host))
    assert str(caught.value).startswith(f"service 'agent-1' has host {host!r}: "), caught.value
    assert expected in str(caught.value)
    is_loopback(host)  # no UnicodeError either


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "0.0.0.0", "10.0.0.255", "::1", "fe80::1%eth0", "agent-1.lan", "robot_2", "Dns1"]
)
def test_hosts_grpc_reads_as_written(host: str) -> None:
    check_endpoint(endpoint(host))


def test_every_peer_a_supervisor_connects_to_is_checked(tmp_path: Path) -> None:
    configs = supervisor_with([subscription("/sample", "service_name=agent-1")])
    for index, host in ((0, "agent..lan"), (2, "unix")):
        broken = [dict(entry, host=host) if number == index else entry for number, entry in enumerate(configs)]
        entries = entries_of(tmp_path, broken)
        with pytest.raises(ConfigError, match=rf"service '{broken[index]['name']}' has host '{host}'"):
            check_entry(find_entry(entries, "supervisor-1"), entries)


def test_the_script_decides_the_role_and_names_the_right_one(tmp_path: Path) -> None:
    configs = [
        *supervisor_with([subscription("/sample", "service_name=agent-1")]),
        {"name": "relay-1", "host": "localhost", "port": 7002, "subscriptions": [subscription("/health", "")]},
        {"name": "Storage-2", "host": "localhost", "port": 7011},
    ]
    entries = entries_of(tmp_path, configs)
    storage = find_entry(entries, "storage")
    with pytest.raises(
        ConfigError,
        match=r"^service 'storage' is a storage \(its name says so\): run it with storage.py, not agent.py$",
    ):
        check_entry(storage, entries, role="agent")
    with pytest.raises(ConfigError, match=r"is an agent .*: run it with agent\.py, not supervisor\.py"):
        check_entry(find_entry(entries, "agent-1"), entries, role="supervisor")
    check_entry(storage, entries, role="storage")
    # A name without a role's prefix runs under any script, checked as that script's role.
    relay = find_entry(entries, "relay-1")
    check_entry(relay, entries, role="agent")
    with pytest.raises(ConfigError, match="must be /sample"):
        check_entry(relay, entries, role="supervisor")
    # One rule for the launcher and the scripts: the prefix, in any case.
    assert [role_of(entry) for entry in entries] == ["agent", "supervisor", "storage", None, "storage"]
    assert [script_role(path) for path in ("agent.py", "/x/storage.py", "supervisor.py", "monitor.py", "agent")] == [
        "agent",
        "storage",
        "supervisor",
        None,
        None,
    ]


def test_a_config_farm_ng_core_cannot_parse_is_a_config_error() -> None:
    entry = Entry(name="x-1", host="localhost", port=1, log_level=0, args=(), raw={"port": "many"})
    with pytest.raises(ConfigError, match=r"^service 'x-1': "):
        entry.service_config()


def test_an_entry_without_a_port_is_not_a_service(tmp_path: Path) -> None:
    entries = entries_of(tmp_path, [{"name": "record_default"}, {"name": "agent-1", "port": 5001}])
    assert [role_of(entry) for entry in entries] == [None, "agent"]
    with pytest.raises(ConfigError, match="has no host"):
        check_entry(entries[1], entries)


# ---------------------------------------------------------------------------------
# Args


def args_of(args_type: type[Any], *args: str) -> Any:
    entry = Entry(name="x-1", host="localhost", port=1, log_level=0, args=args, raw={})
    return parse_args(entry, args_type)


def problem(args_type: type[Any], *args: str) -> str:
    with pytest.raises(ConfigError) as caught:
        args_of(args_type, *args)
    return str(caught.value)


@pytest.mark.parametrize(
    ("args_type", "args", "expected"),
    [
        (AgentArgs, ["rate=5"], "missing arg 'num_tasks'"),
        (AgentArgs, ["rate=5", "num_tasks=2", "speed=3"], "unknown arg 'speed' (it takes: rate, num_tasks)"),
        (AgentArgs, ["rate", "num_tasks=2"], "arg 'rate' is not of the form key=value"),
        (AgentArgs, ["rate=fast", "num_tasks=2"], "arg rate='fast' is not a number"),
        (AgentArgs, ["rate=5", "num_tasks=2.5"], "arg num_tasks='2.5' is not a whole number"),
        (AgentArgs, ["rate=0", "num_tasks=2"], "arg rate=0 must be in 0.01..10000"),
        (AgentArgs, ["rate=1e-300", "num_tasks=2"], "arg rate=1e-300 must be in 0.01..10000"),
        (AgentArgs, ["rate=nan", "num_tasks=2"], "arg rate='nan' is not a finite number"),
        (AgentArgs, ["rate=inf", "num_tasks=2"], "arg rate='inf' is not a finite number"),
        (AgentArgs, ["rate=5", "num_tasks=0"], "arg num_tasks=0 must be in 1..1000"),
        (AgentArgs, ["rate=5", "num_tasks=1000000000"], "arg num_tasks=1000000000 must be in 1..1000"),
        (AgentArgs, ["rate=100", "num_tasks=1000"], "rate x num_tasks = 100000 must be at most 10000"),
        (AgentArgs, ["rate=5", "rate=6", "num_tasks=1"], "arg 'rate' is given twice"),
        (SupervisorArgs, ["confidence=1.5"], "arg confidence=1.5 must be in 0..1"),
        (SupervisorArgs, ["confidence=-0.1"], "arg confidence=-0.1 must be in 0..1"),
        (SupervisorArgs, ["confidence=0.5", "max_in_flight=0"], "arg max_in_flight=0 must be in 1..64"),
        (SupervisorArgs, ["confidence=0.5", "max_in_flight=1000000000"], "max_in_flight=1000000000 must be in 1..64"),
        (SupervisorArgs, ["confidence=0.5", "max_batch=65"], "arg max_batch=65 must be in 1..64"),
        (StorageArgs, ["max_storage=0", "batch_size=1"], "arg max_storage=0 must be in 1..2147483647"),
        (StorageArgs, ["max_storage=2147483648", "batch_size=1"], "max_storage=2147483648 must be in 1..2147483647"),
        (StorageArgs, ["max_storage=10", "batch_size=11"], "arg batch_size=11 must be in 1..max_storage (10)"),
        (StorageArgs, ["max_storage=10", "batch_size=0"], "arg batch_size=0 must be in 1..2147483647"),
        (StorageArgs, ["max_storage=10", "batch_size=5", "drain_period=0"], "drain_period=0 must be in 0.01..60"),
    ],
)
def test_bad_args(args_type: type[Any], args: list[str], expected: str) -> None:
    message = problem(args_type, *args)
    assert message.startswith("service 'x-1': "), message
    assert expected in message


def test_args_parse_into_their_types() -> None:
    assert args_of(AgentArgs, "rate=5", "num_tasks=10") == AgentArgs(rate=5.0, num_tasks=10)
    assert args_of(SupervisorArgs, " confidence = 0.25 ") == SupervisorArgs(confidence=0.25)
    assert args_of(SupervisorArgs, "confidence=0.5").max_in_flight == 8
    storage = args_of(StorageArgs, "max_storage=500", "batch_size=50", "drain_period=2")
    assert (storage.max_storage, storage.batch_size, storage.drain_period) == (500, 50, 2.0)
