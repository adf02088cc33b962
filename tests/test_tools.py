"""farm-ng-core's tools and ours, as the README runs them, against live services.

- ``python -m farm_ng.core.event_service_tool uris``: the URIs a service publishes;
- ``watch.py``: a stream, decoded, one event a line;
- ``recorder.py`` (farm-ng-core's ``RecorderService``) driven by
  ``python -m farm_ng.core.event_service_recorder start`` / ``stop`` with
  ``record_config.json``, then ``read_recording.py`` and ``plot.py`` on the recording.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from helpers import ROOT, STARTUP_TIMEOUT_S, Process, Services, free_ports, write_config

RECORD_CONFIG = ROOT / "tools" / "record_config.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_module(services: Services, module: str, *args: str) -> Process:
    """Starts ``python -m module args...``; the fixture stops it like the services."""
    process = Process(module.rsplit(".", 1)[-1], [sys.executable, "-m", module, *args])
    services.started.append(process)
    return process


def finish(process: Process, timeout: float = 15.0) -> Process:
    """Waits for a command to exit 0; fails with its output otherwise."""
    assert process.wait_exit(timeout) == 0, process.output
    assert "Traceback" not in process.output, process.output
    return process


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Waits until ``condition()`` holds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(0.05)  # readiness-free: polls the condition, bounded by the deadline


def record_config_for(config: Path, directory: Path) -> Path:
    """record_config.json with the ports of ``config`` and a free port for the recorder.

    The recorder records into ``directory``.
    """
    ports = {entry["name"]: entry["port"] for entry in json.loads(config.read_text())["configs"]}
    entries = json.loads(RECORD_CONFIG.read_text())["configs"]
    for entry in entries:
        if entry["name"] == "recorder":
            entry.update(port=free_ports(1)[0], args=[f"--data-dir={directory}"])
        elif entry["name"] in ports:
            entry["port"] = ports[entry["name"]]
    path = directory / "record_config.json"
    path.write_text(json.dumps({"configs": entries}, indent=2))
    return path


def test_record_config_names_the_services_of_service_config() -> None:
    services = {entry["name"]: entry for entry in json.loads((ROOT / "service_config.json").read_text())["configs"]}
    entries = {entry["name"]: entry for entry in json.loads(RECORD_CONFIG.read_text())["configs"]}
    assert entries["recorder"]["port"] not in {entry["port"] for entry in services.values()}
    assert entries["recorder"]["args"] == ["--data-dir=recordings"]
    assert "port" not in entries["record_default"]
    recorded = {
        (subscription["uri"]["query"].split("=")[1], subscription["uri"]["path"])
        for subscription in entries["record_default"]["subscriptions"]
    }
    for agent in ("agent-1", "agent-2", "agent-3"):
        assert {(agent, "/sample"), (agent, "/stats")} <= recorded
    assert ("storage", "*") in recorded
    # The recorder reaches each recorded service where service_config.json puts it.
    for name, _ in recorded:
        assert (entries[name]["host"], entries[name]["port"]) == (services[name]["host"], services[name]["port"])


def test_uris_and_watch_show_a_live_service(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    services.service(config, "agent-3")

    uris = finish(
        run_module(
            services,
            "farm_ng.core.event_service_tool",
            "uris",
            "--service-config",
            str(config),
            "--service-name",
            "agent-3",
        )
    )
    assert uris.lines[0] == 'connecting to name: "agent-3"', uris.output
    listed = json.loads("\n".join(uris.lines[uris.lines.index("{") :]))
    assert listed["name"] == "agent-3"
    assert {uri["path"] for uri in listed["uris"]} == {"/sample", "/stats", "/health"}
    assert all("service_name=agent-3" in uri["query"] for uri in listed["uris"])

    args = ("--service-config", str(config), "--service-name", "agent-3", "--path", "/sample", "--count", "3")
    watch = finish(services.tool("watch", *args))
    assert len(watch.lines) == 3, watch.output
    for line in watch.lines:
        assert re.fullmatch(r'agent-3/sample \d+ \{"sample": [0-9.e-]+, "task_id": 0\.0\}', line), line
    sequences = [int(line.split()[1]) for line in watch.lines]
    assert sequences == sorted(set(sequences)), sequences


# matplotlib's first import builds a font cache: busy, like the other tests of the group.
@pytest.mark.xdist_group("cpu")
def test_a_recording_reads_back_and_plots(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for name in ("storage", "agent-3", "supervisor-2"):
        services.service(config, name, wait=False)
    record_config = record_config_for(config, tmp_path)
    command = ("--service-config", str(record_config), "--service-name", "recorder")
    recorder = services.tool("recorder", *command, label="recorder")
    recorder.wait_for(r"^recorder serving on ", STARTUP_TIMEOUT_S)

    start = finish(run_module(services, "farm_ng.core.event_service_recorder", "start", *command))
    # It prints the recording's name (and, on Python 3.12, a DeprecationWarning).
    base = start.matches(r'^value: "(.+)"$')
    assert base, start.output
    recording = Path(base[0].group(1) + ".0000.bin")
    # The recorder writes through a buffer: a size above 0 means events are in.
    wait_until(lambda: recording.exists() and recording.stat().st_size > 0, 10, f"nothing recorded in {recording}")
    finish(run_module(services, "farm_ng.core.event_service_recorder", "stop", *command))
    recorder.wait_for("^done recording$")  # the file is closed

    read = finish(services.tool("read_recording", str(recording)))
    counts = {match.group(1): int(match.group(2)) for match in read.matches(r"^(\S+/\S+) (\d+)$")}
    assert counts.get("agent-3/sample", 0) > 0, read.output
    assert counts.get("storage/stats", 0) > 0, read.output
    read.wait_for(r"^\d+ events, \d+\.\d s$")

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install -r requirements-dev.txt): plot.py not tested")
    picture = tmp_path / "plot.png"
    finish(services.tool("plot", str(recording), "-o", str(picture)), timeout=60)
    data = picture.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == (720, 440)
    assert 10_000 < len(data) < 150_000
    # Bad output: one line, no traceback.
    refused = services.tool("plot", str(recording), "-o", str(tmp_path / "no-such-folder" / "plot.png"))
    assert refused.wait_exit(60) == 1
    assert refused.lines == [
        f"error: cannot write {tmp_path}/no-such-folder/plot.png: folder {tmp_path}/no-such-folder does not exist"
    ]
