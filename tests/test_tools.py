"""farm-ng-core's tools and ours, as the README runs them, against live services.

- ``python -m farm_ng.core.event_service_tool uris``: the URIs a service publishes;
- ``watch.py``: a stream, decoded, one event a line;
- ``recorder.py`` (farm-ng-core's ``RecorderService``) driven by
  ``python -m farm_ng.core.event_service_recorder start`` / ``stop`` with
  ``record_config.json``, then ``read_recording.py`` and ``plot.py`` on the recording:
  its pause and resume marks are the agents' own counters.
"""

from __future__ import annotations

import importlib.util
import json
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from fakes import publishing_stats
from farm_ng.core.event_pb2 import Event
from farm_ng.core.stamp import StampSemantics
from farm_ng.core.timestamp_pb2 import Timestamp
from farm_ng.core.uri import make_proto_uri
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value
from helpers import (
    ROOT,
    STARTUP_TIMEOUT_S,
    WAIT_TIMEOUT_S,
    Process,
    Services,
    free_ports,
    port_of,
    raw_request,
    write_config,
)

from tools import plot

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
            entry.update(port=free_ports(1, taken=ports.values())[0], args=[f"--data-dir={directory}"])
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
        assert {(agent, "/sample"), (agent, "/pauses"), (agent, "/stats")} <= recorded
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
    assert {uri["path"] for uri in listed["uris"]} == {"/sample", "/pauses", "/stats", "/health"}
    assert all("service_name=agent-3" in uri["query"] for uri in listed["uris"])

    args = ("--service-config", str(config), "--service-name", "agent-3", "--path", "/sample", "--count", "3")
    watch = finish(services.tool("watch", *args))
    # On stderr, merged here: that it reached the service.
    assert watch.lines[0] == f"agent-3 is up at localhost:{port_of(config, 'agent-3')}", watch.output
    assert len(watch.lines) == 4, watch.output
    for line in watch.lines[1:]:
        assert re.fullmatch(r'agent-3/sample \d+ \{"sample": [0-9.e-]+, "task_id": 0\.0\}', line), line
    sequences = [int(line.split()[1]) for line in watch.lines[1:]]
    assert sequences == sorted(set(sequences)), sequences

    # A path without its slash: said at once. A path the service does not publish: the
    # service's refusal, said once, while watch keeps trying.
    base = ("--service-config", str(config), "--service-name", "agent-3", "--path")
    no_slash = services.tool("watch", *base, "sample")
    assert no_slash.wait_exit(STARTUP_TIMEOUT_S) == 1
    assert no_slash.lines == ["error: --path 'sample' must start with '/' (e.g. /sample), or be '*'"], no_slash.output
    unknown = services.tool("watch", *base, "/samples")
    unknown.wait_for(r"^agent-3: 1 subscription\(s\) to '/samples' refused \(NOT_FOUND\)$", STARTUP_TIMEOUT_S)
    unknown.signal(signal.SIGINT)
    assert unknown.wait_exit(5) == 0, unknown.output

    # `| head -1`: the reader goes after one line; watch ends quietly.
    argv = [sys.executable, "-m", "tools.watch", *base, "/sample"]
    headed = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert headed.stdout is not None and headed.stderr is not None
        ready, _, _ = select.select([headed.stdout], [], [], STARTUP_TIMEOUT_S)
        assert ready, "watch printed nothing"
        assert headed.stdout.readline().startswith(b"agent-3/sample ")
        headed.stdout.close()
        assert headed.wait(STARTUP_TIMEOUT_S) == 0
        said = headed.stderr.read().decode().splitlines()
        assert all(re.fullmatch(r"agent-3 is up at localhost:\d+", line) for line in said), said
    finally:
        if headed.poll() is None:
            headed.kill()
            headed.wait(5)


def test_watch_says_when_it_cannot_reach_the_service_and_shows_invalid_figures(
    services: Services, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    args = ("--service-config", str(config), "--service-name", "agent-3", "--path", "/stats", "--count", "1")
    watch = services.tool("watch", *args)
    port = port_of(config, "agent-3")
    watch.wait_for(rf"^agent-3 is not up yet at localhost:{port}; retrying$", STARTUP_TIMEOUT_S)
    # Up, and publishing a /stats with numbers JSON cannot hold: shown, marked invalid.
    with publishing_stats(config, {"agent-3": {"published": float("nan"), "rate": "fast"}}):
        assert watch.wait_exit(WAIT_TIMEOUT_S) == 0, watch.output
    watch.wait_for(rf"^agent-3 is up at localhost:{port}$")
    shown = watch.wait_for(r"^agent-3/stats \d+ (.*)$").group(1)
    assert 'key: "published" value { number_value: nan }' in shown, shown
    assert shown.endswith("(invalid: Fail to serialize NaN for Value.number_value, which would parse as string_value)")


# A storage that fills in a fraction of a second and drains every half second: every
# agent pauses and resumes about twice a second.
SMALL_STORAGE = {"storage": {"args": ["max_storage=10", "batch_size=5", "drain_period=0.5"]}}
AGENTS = ("agent-1", "agent-2", "agent-3")


def wait_line(process: Process, pattern: str, start: int) -> int:
    """Waits for a line matching ``pattern`` from index ``start`` on; returns the index after it."""
    process.wait_for(pattern, timeout=15, start=start)
    regex = re.compile(pattern)
    return next(index for index in range(start, len(process.lines)) if regex.search(process.lines[index])) + 1


def wait_pause_and_resume(agent: Process) -> None:
    """Waits until an agent, from now on, paused, resumed and paused again.

    It prints ``Remainder: 0`` when it hears storage is full and pauses, a remainder
    above 0 when it resumes: a whole cycle from now lies inside the recording.
    """
    after = wait_line(agent, r"^Remainder: 0$", len(agent.lines))
    after = wait_line(agent, r"^Remainder: [1-9]\d*$", after)
    wait_line(agent, r"^Remainder: 0$", after)


def test_the_recorder_refuses_a_request_naming_another_module(services: Services, tmp_path: Path) -> None:
    record_config = record_config_for(write_config(tmp_path), tmp_path)
    command = ("--service-config", str(record_config), "--service-name", "recorder")
    recorder = services.tool("recorder", *command, label="recorder")
    recorder.wait_for(r"^recorder serving on ", STARTUP_TIMEOUT_S)
    # The right type, but pb= names another module: RecorderService decodes a request by
    # importing the module pb= names, so this must not reach it.
    hostile = "type=farm_ng.core.proto.EventServiceConfigList&pb=this"
    code, details = raw_request(record_config, "recorder", "/start/record_default", b"", hostile)
    assert (code, details) == ("INVALID_ARGUMENT", "farm_ng.core.proto.EventServiceConfigList is not defined in 'this'")
    empty = "type=google.protobuf.Empty&pb=google/protobuf/empty.proto"
    assert raw_request(record_config, "recorder", "/stop", b"", empty) == ("OK", "")  # still serving
    assert "Traceback" not in recorder.output, recorder.output


# matplotlib's first import builds a font cache: busy, like the other tests of the group.
@pytest.mark.xdist_group("cpu")
def test_a_recording_reads_back_and_plots_the_agents_own_pauses(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, SMALL_STORAGE)
    running = {name: services.service(config, name, wait=False) for name in ("storage", *AGENTS)}
    running.update({name: services.service(config, name, wait=False) for name in ("supervisor-1", "supervisor-2")})
    record_config = record_config_for(config, tmp_path)
    command = ("--service-config", str(record_config), "--service-name", "recorder")
    recorder = services.tool("recorder", *command, label="recorder")
    recorder.wait_for(r"^recorder serving on ", STARTUP_TIMEOUT_S)
    for name, process in running.items():
        process.wait_for(rf"^{re.escape(name)} serving on ", STARTUP_TIMEOUT_S)

    start = finish(run_module(services, "farm_ng.core.event_service_recorder", "start", *command))
    # It prints the recording's name (and, on Python 3.12, a DeprecationWarning).
    base = start.matches(r'^value: "(.+)"$')
    assert base, start.output
    recording = Path(base[0].group(1) + ".0000.bin")
    for agent in AGENTS:
        wait_pause_and_resume(running[agent])
    finish(run_module(services, "farm_ng.core.event_service_recorder", "stop", *command))
    recorder.wait_for("^done recording$")  # the file is closed

    read = finish(services.tool("read_recording", str(recording)))
    counts = {match.group(1): int(match.group(2)) for match in read.matches(r"^(\S+/\S+) (\d+)$")}
    for agent in AGENTS:
        assert counts.get(f"{agent}/sample", 0) > 0, read.output
        assert counts.get(f"{agent}/pauses", 0) > 0, read.output
    assert counts.get("storage/level", 0) > 0, read.output
    read.wait_for(r"^\d+ events, \d+\.\d s$")
    # Latched: at least storage's /level, /residual and /stats and each agent's /stats.
    latched = read.wait_for(r"^(\d+) of them sent before the recording started \(latched\)$")
    assert int(latched.group(1)) >= 6, read.output

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install -r requirements-dev.txt): plot.py not tested")
    picture = tmp_path / "plot.png"
    plotted = finish(services.tool("plot", str(recording), "-o", str(picture)), timeout=60)
    for agent in AGENTS:
        match = plotted.wait_for(rf"^{agent}: (\d+) pauses, (\d+) resumes \(its counters: \+(\d+), \+(\d+)\)$")
        marks, counted = match.group(1, 2), match.group(3, 4)
        assert marks == counted, plotted.output
        assert int(marks[0]) >= 1 and int(marks[1]) >= 1, plotted.output
    storage = plotted.wait_for(
        r"^storage: refused \+(\d+) stores .* in (\d+) of its /stats intervals; .* (\d+) of them$"
    )
    assert int(storage.group(1)) > 0, plotted.output
    assert storage.group(2) == storage.group(3), plotted.output  # the line is at max_storage at each refusal
    # Nothing sent before the recording started is drawn after it: the last /level sent
    # before the start is the fill at 0. (Whether there is one is a race: storage may have
    # latched a newer /level by the time the recorder's subscription reached it.)
    loaded = plot.load(recording)
    levels = loaded.fill_levels()
    at_start, drawn = plot.clipped(levels, loaded.start())
    earlier = [count for stamp, count in levels if stamp < loaded.start()]
    assert at_start == (earlier[-1] if earlier else None)
    assert drawn and all(stamp >= loaded.start() for stamp, _ in drawn)
    assert len(drawn) + len(earlier) == len(levels)
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


def test_marks_count_what_the_counters_count() -> None:
    # A latched /pauses (sent before the start) is the agents' state then, not a mark.
    latched = plot.Counters(sent=9.0, pauses=2, resumes=1, paused=True)
    stats = plot.Counters(sent=9.5, pauses=2, resumes=1)
    resumed = plot.Counters(sent=10.5, pauses=2, resumes=2, paused=False)
    paused = plot.Counters(sent=11.0, pauses=3, resumes=2, paused=True)
    figures = plot.pause_figures([stats, paused, latched, resumed, resumed], started=10.0)
    assert (figures.pauses, figures.resumes) == ([11.0], [10.5])  # the duplicate once
    assert (figures.counted_pauses, figures.counted_resumes) == (1, 1)
    assert figures.line("agent-1") == "agent-1: 1 pauses, 1 resumes (its counters: +1, +1)"
    # A transition whose /pauses the recording lacks shows as a difference.
    later = plot.Counters(sent=12.0, pauses=3, resumes=3)
    assert not plot.pause_figures([latched, paused, later], started=10.0).agree()
    # An agent that restarted counts from 0 again.
    again = plot.Counters(sent=13.0, pauses=1, resumes=0, paused=True)
    figures = plot.pause_figures([latched, paused, again], started=10.0)
    assert (len(figures.pauses), figures.counted_pauses) == (2, 2)
    # The /pauses an agent publishes at its start is its state, not a resume.
    started = plot.Counters(sent=10.1, pauses=0, resumes=0, paused=False)
    figures = plot.pause_figures([started, plot.Counters(sent=11.1, pauses=0, resumes=0, paused=False)], 10.0)
    assert (figures.pauses, figures.resumes, figures.counted_resumes) == ([], [], 0)
    # Without a message before the start, a first transition is a mark.
    figures = plot.pause_figures([plot.Counters(sent=10.2, pauses=1, resumes=0, paused=True)], started=10.0)
    assert (len(figures.pauses), figures.counted_pauses) == (1, 1)


def write_recording(path: Path, events: list[tuple[str, str, Message]]) -> Path:
    """A recording as farm-ng-core's recorder writes one: each event's length, the event, its payload.

    ``events`` are (service, path, message), sent 0.1 s apart and received 1 ms later.
    """
    with path.open("wb") as out:
        for index, (service, uri_path, message) in enumerate(events):
            payload = message.SerializeToString()
            uri = make_proto_uri(path=uri_path, message=message)
            uri.query += f"&service_name={service}"
            stamps = [
                Timestamp(stamp=100 + index / 10, clock_name="host/monotonic", semantics=StampSemantics.SERVICE_SEND),
                Timestamp(
                    stamp=100.001 + index / 10, clock_name="host/monotonic", semantics=StampSemantics.CLIENT_RECEIVE
                ),
            ]
            data = Event(uri=uri, timestamps=stamps, payload_length=len(payload)).SerializeToString()
            out.write(struct.pack("<I", len(data)) + data + payload)
    return path


def figures(**values: Any) -> Struct:
    """A ``Struct`` of figures."""
    message = Struct()
    message.update(values)
    return message


def test_a_recording_with_malformed_figures_reads_back_and_plots(services: Services, tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    recording = write_recording(
        tmp_path / "odd.0000.bin",
        [
            ("storage", "/level", figures(count=5, max_storage=10)),
            ("storage", "/level", figures(count=nan, max_storage=inf)),
            ("storage", "/stats", figures(count=6, max_storage="ten", refused=0)),
            ("agent-1", "/stats", figures(pauses=nan, resumes=0)),
            *[("agent-1", "/sample", figures(sample=0.5, task_id=0)) for _ in range(10)],
            ("agent-1", "/pauses", figures(paused="yes", pauses=1, resumes=0)),
            ("storage", "/residual", Int32Value(value=4)),
        ],
    )
    read = finish(services.tool("read_recording", str(recording)))
    assert read.matches(r"^storage/level 2$") and read.matches(r"^agent-1/sample 10$"), read.output
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install -r requirements-dev.txt): plot.py not tested")
    plotted = finish(services.tool("plot", str(recording), "-o", str(tmp_path / "odd.png")), timeout=60)
    for name in ("agent-1/pauses", "agent-1/stats", "storage/level", "storage/stats"):
        plotted.wait_for(rf"^note: 1 events of {name} left out: a figure in them is not a number$")
    assert (tmp_path / "odd.png").read_bytes()[:8] == PNG_SIGNATURE


def test_every_mark_of_the_fill_panel_is_on_the_page_and_in_the_legend() -> None:
    pyplot = pytest.importorskip("matplotlib.pyplot")
    recording = plot.Recording(started=100.0, max_storage=10)
    recording.levels = [(99.0, 4), (100.5, 10), (101.0, 5)]
    recording.counters["agent-1"] = [
        plot.Counters(100.4, 1, 0, paused=True),
        plot.Counters(101.1, 1, 1, paused=False),
    ]
    figure, axes = pyplot.subplots()
    try:
        plot.draw_fill(axes, recording, recording.start())
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        at_start = next(line for line in axes.get_lines() if line.get_label().startswith("items at the start"))
    finally:
        pyplot.close(figure)
    assert "max_storage" in labels
    # The pause marks sit above the max_storage line, a row per agent: the legend says so.
    assert any(label.startswith("an agent paused") and "above\nmax_storage" in label for label in labels), labels
    assert any(label.startswith("it resumed") and "per agent" in label for label in labels), labels
    # The fill at the start sits on the y-axis: drawn over it, not clipped away under it.
    assert list(at_start.get_xdata()) == [0] and not at_start.get_clip_on()


TOOLS = ("launch", "monitor", "watch", "recorder", "read_recording", "plot", "bench")
ROLE_SCRIPTS = ("agent.py", "supervisor.py", "storage.py")


@pytest.mark.parametrize(
    "command",
    [*(["-m", f"tools.{tool}"] for tool in TOOLS), *([script] for script in ROLE_SCRIPTS)],
    ids=lambda command: command[-1],
)
def test_without_the_venv_a_script_says_how_to_get_it(command: list[str]) -> None:
    # -S: this Python without its site-packages, as python3 outside .venv.
    argv = [sys.executable, "-S", *command, "--help"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_TIMEOUT_S, check=False)
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr == (
        f"error: {command[-1]} needs the packages of requirements.txt (farm_ng is missing from {sys.executable}):"
        " run ./run.sh --setup, then . .venv/bin/activate\n"
    )
