"""Start orders, restarts and outages: the system finds its way back to propagating."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import WAIT_TIMEOUT_S, Process, Services, port_of, stats, write_config

README_ORDER = ["storage", "supervisor-1", "supervisor-2", "agent-1", "agent-2", "agent-3"]
# Propagation through a restarted service resumes within seconds of its return on a quiet
# machine; beside the rest of the suite on two cores, only a hang takes longer than this.
RESUME_S = WAIT_TIMEOUT_S


def assert_propagating(running: dict[str, Process], timeout: float = WAIT_TIMEOUT_S) -> None:
    """Every agent hears a residual, and storage stores, from now on."""
    for name, process in running.items():
        if name.startswith("agent"):
            process.wait_for(r"^Remainder: \d+$", timeout, start=len(process.lines))
    storage = running["storage"]
    storage.wait_for(r"^Storage: \d+/500 ", timeout, start=len(storage.lines))


def assert_survived(running: dict[str, Process]) -> None:
    for process in running.values():
        assert process.popen.poll() is None, f"{process.label} exited:\n{process.output}"
        assert "Traceback" not in process.output, process.output


@pytest.mark.parametrize(
    "order",
    [README_ORDER, README_ORDER[::-1], ["supervisor-1", "supervisor-2", "storage", "agent-1", "agent-2", "agent-3"]],
    ids=["readme", "reverse", "supervisors-first"],
)
def test_any_start_order(services: Services, tmp_path: Path, order: list[str]) -> None:
    running = services.system(write_config(tmp_path), order)
    assert_propagating(running)
    assert_survived(running)


def test_a_supervisor_says_which_agent_is_not_up_yet(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    services.service(config, "storage")
    supervisor = services.service(config, "supervisor-1")
    agent_1 = rf"agent-1 is not up yet at localhost:{port_of(config, 'agent-1')}; retrying"
    supervisor.wait_for(rf"^{agent_1}$")
    services.service(config, "agent-1")
    supervisor.wait_for(r"^agent-1 is up at localhost:\d+$")
    assert supervisor.count(agent_1) == 1


def restart(services: Services, config: Path, running: dict[str, Process], name: str) -> Process:
    """SIGKILLs a service, checks the others live on, starts it again."""
    running[name].popen.kill()
    running[name].wait_exit(5)
    survivors = {other: process for other, process in running.items() if other != name}
    assert_survived(survivors)
    running[name] = services.service(config, name)
    return running[name]


def test_storage_restart(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    running = services.system(config)
    assert_propagating(running)
    supervisor = running["supervisor-1"]
    restart(services, config, running, "storage")
    supervisor.wait_for("storage is back", RESUME_S)
    assert_propagating(running, RESUME_S)
    assert supervisor.count("storage is unreachable") == 1


def test_supervisor_restart(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    running = services.system(config)
    assert_propagating(running)
    restart(services, config, running, "supervisor-1")
    for name in ("agent-1", "agent-2"):
        running[name].wait_for(r"^Remainder: \d+$", RESUME_S, start=len(running[name].lines))
    assert_survived(running)


def test_agent_restart(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    running = services.system(config)
    assert_propagating(running)
    supervisor = running["supervisor-2"]
    agent = restart(services, config, running, "agent-3")
    agent.wait_for(r"^Remainder: \d+$", RESUME_S)
    supervisor.wait_for("agent-3 is back", RESUME_S)
    assert supervisor.count("agent-3 is unreachable") <= 1
    assert_survived(running)


def test_storage_stopped_and_started_again_at_once(services: Services, tmp_path: Path) -> None:
    # A graceful stop leaves the supervisors' connections in TIME_WAIT: the port must
    # still be usable at once.
    config = write_config(tmp_path)
    running = services.system(config, ["storage", "supervisor-2", "agent-3"])
    running["supervisor-2"].wait_for("Residual: value:", count=5)
    running["storage"].signal(signal.SIGTERM)
    assert running["storage"].wait_exit(5) == 0
    running["storage"] = services.service(config, "storage")
    running["storage"].wait_for(r"^Storage: 1/500 ", RESUME_S)
    assert_survived(running)


def test_ctrl_c_of_an_agent_while_relaying(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"agent-3": {"args": ["rate=300", "num_tasks=1"]}})
    running = services.system(config, ["storage", "supervisor-2", "agent-3"])
    running["supervisor-2"].wait_for("Residual: value:", count=30)
    running["agent-3"].signal(signal.SIGINT)
    assert running["agent-3"].wait_exit(5) == 0
    running["supervisor-2"].wait_for("agent-3 is unreachable")
    assert_survived({"storage": running["storage"], "supervisor-2": running["supervisor-2"]})


def count_connections(port: int, seconds: float, ignore_first: float) -> int:
    """Listens on ``port`` for ``seconds``, closing each connection at once; counts those after ``ignore_first``."""
    counted = 0
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(0.2)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            connection.close()
            counted += time.monotonic() - started > ignore_first
    return counted


@pytest.mark.slow
def test_a_peer_that_is_down_is_tried_every_second(services: Services, tmp_path: Path) -> None:
    # gRPC's reconnect backoff grows to tens of seconds by default: 40 s into an outage it
    # would try about once in the last 30 s, and a peer back then would go unnoticed for
    # that long. Capped at 1 s, a supervisor tries about 30 times. Its peer's port is held
    # by a socket that counts the attempts and closes each at once, as a peer not up would.
    config = write_config(tmp_path)
    running = services.system(config, ["storage", "supervisor-2", "agent-3"])
    running["storage"].popen.kill()
    running["storage"].wait_exit(5)
    supervisor = running["supervisor-2"]
    supervisor.wait_for("storage is unreachable")
    attempts = count_connections(port_of(config, "storage"), seconds=40, ignore_first=10)
    assert attempts >= 10, attempts
    running["storage"] = services.service(config, "storage")
    supervisor.wait_for("storage is back", RESUME_S)
    assert_propagating(running, RESUME_S)
    assert (supervisor.count("storage is unreachable"), supervisor.count("storage is back")) == (1, 1)
    print(f"{attempts} connection attempts in the last 30 s of a 40 s outage")


# Many processes busy at once: never beside another such test (xdist group).
@pytest.mark.xdist_group("cpu")
def test_storage_fills_and_drains_and_agents_resume(services: Services, tmp_path: Path) -> None:
    # Agents offer far more than storage drains: it fills within a second, again and
    # again, and every agent that paused at 0 must start again after each drain.
    config = write_config(
        tmp_path,
        {
            "storage": {"args": ["max_storage=20", "batch_size=10"]},
            "agent-2": {"args": ["rate=50", "num_tasks=5"]},
            "agent-3": {"args": ["rate=300", "num_tasks=1"]},
        },
    )
    running = services.system(config)
    storage = running["storage"]
    storage.wait_for(r"^Removed from storage: 10/20$", timeout=40, count=150)  # 15 s of drains
    for name in ("agent-2", "agent-3"):
        remainders = [int(m.group(1)) for m in running[name].matches(r"^Remainder: (-?\d+)$")]
        pauses = sum(1 for before, now in zip([1, *remainders], remainders) if before > 0 >= now)
        figures = stats(config, name)  # after the count: it has seen every pause counted
        assert pauses >= 5, (name, remainders)
        # Resumed after every pause, but perhaps the one under way.
        assert figures["resumes"] >= pauses - 1, (name, pauses, figures)
    counts = [int(m.group(1)) for m in storage.matches(r"^Storage: (\d+)/20 ")]
    # Filled to the limit, never past it, and emptied by drains in between (a store after a
    # drain of 10 from at most 20 prints at most 11).
    assert counts and max(counts) == 20 and min(counts) <= 11, counts
    assert storage.count(r"^Storage full: 20/20, store refused") >= 1
    # Still storing at the end: nothing froze.
    storage.wait_for(r"^Storage: \d+/20 ", timeout=5, start=len(storage.lines))
    assert_survived(running)


def test_agents_stopped_while_paused_at_a_full_storage_resume(services: Services, tmp_path: Path) -> None:
    # The case: storage full, the agents paused; they stop for 3 s (a laptop that
    # sleeps, a Wi-Fi blip) while storage drains, so the wake-ups after the drain are lost;
    # storage empties in one batch and never drains again. Storage re-asserts its residual
    # every drain_period (2 s), and the supervisors forward it to each agent that says it is
    # paused: within B = 2 x 2 s + 1 s on a quiet machine (the simulation in test_liveness.py
    # holds them to it); here only a hang lasts WAIT_TIMEOUT_S.
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=20", "batch_size=20", "drain_period=2"]}})
    running = services.system(config)
    agents = {name: process for name, process in running.items() if name.startswith("agent")}
    running["storage"].wait_for(r"^Removed from storage: 20/20$")
    drained = {name: len(process.lines) for name, process in agents.items()}
    for name, process in agents.items():  # all paused as storage filled again: its next drain is ~2 s off
        process.wait_for(r"^Remainder: 0$", start=drained[name])
    for process in agents.values():
        process.signal(signal.SIGSTOP)
    time.sleep(3)  # readiness-free: the stop itself, longer than a drain period
    for process in agents.values():
        process.signal(signal.SIGCONT)
    continued = time.monotonic()
    published = {name: stats(config, name)["published"] for name in agents}
    resumed = {}
    while len(resumed) < len(agents) and time.monotonic() < continued + WAIT_TIMEOUT_S:
        for name in set(agents) - set(resumed):
            if stats(config, name, fresh=1)["published"] > published[name]:
                resumed[name] = time.monotonic() - continued
    assert set(resumed) == set(agents), (resumed, {name: stats(config, name) for name in agents})
    print("publishing again after SIGCONT, s:", {name: round(seconds, 1) for name, seconds in resumed.items()})
    assert_survived(running)


def test_what_the_supervisors_count_adds_up_with_what_storage_counts(services: Services, tmp_path: Path) -> None:
    # A store whose call leaves but gets no answer in time (storage stopped, here) may or may
    # not have been stored: the supervisor counts it as unconfirmed. So, once all is quiet,
    # storage's count of stores lies between what the supervisors know was stored or refused
    # and that plus what they could not confirm, exactly; and between them they saw every
    # sample above confidence.
    # Storage empties when full: after a drain, the agents publish for about a second before
    # it is full again, and the stop must find stores under way, not agents paused.
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=100", "batch_size=100", "drain_period=1"]}})
    running = services.system(config)
    storage = running["storage"]
    storage.wait_for(r"^Storage full: 100/100")  # refusals too
    storage.wait_for(r"^Removed from storage", start=len(storage.lines))
    storage.wait_for(r"^Storage: \d+/100 ", start=len(storage.lines))
    storage.signal(signal.SIGSTOP)
    time.sleep(1.5)  # readiness-free: the stop itself, longer than a call's timeout
    storage.signal(signal.SIGCONT)
    storage.wait_for(r"^Storage: \d+/100 ", start=len(storage.lines))
    for name in ("agent-1", "agent-2", "agent-3"):
        running[name].signal(signal.SIGTERM)
        assert running[name].wait_exit(WAIT_TIMEOUT_S) == 0
    keys = ("received", "malformed", "below_confidence", "too_old", "stored", "refused", "not_stored", "unconfirmed")
    quiet: dict[str, dict[str, float]] = {}
    for _ in range(30):  # the supervisors finish what they hold
        quiet = {name: stats(config, name) for name in ("supervisor-1", "supervisor-2")}
        later = {name: stats(config, name) for name in quiet}
        if all(quiet[name] == later[name] and later[name]["pending"] == 0 for name in quiet):
            break
    counted = {key: sum(figures[key] for figures in quiet.values()) for key in (*keys, "dropped")}
    stored = stats(config, "storage")
    assert counted["unconfirmed"] > 0, counted
    assert counted["stored"] <= stored["accepted"] <= counted["stored"] + counted["unconfirmed"], (counted, stored)
    assert counted["refused"] <= stored["refused"] <= counted["refused"] + counted["unconfirmed"], (counted, stored)
    known = counted["stored"] + counted["refused"]
    assert known <= stored["accepted"] + stored["refused"] <= known + counted["unconfirmed"], (counted, stored)
    outcomes = sum(counted[key] for key in keys[1:]) + counted["dropped"]
    assert outcomes == counted["received"], counted
    print("supervisors:", counted, "storage:", {key: stored[key] for key in ("accepted", "refused")})
