"""Start orders, restarts and outages: the system finds its way back to propagating."""

from __future__ import annotations

import signal
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


@pytest.mark.slow
def test_peers_back_after_a_minute(services: Services, tmp_path: Path) -> None:
    # gRPC's reconnect backoff grows to tens of seconds by default: a peer that returns
    # after a minute would go unnoticed for that long.
    config = write_config(tmp_path)
    running = services.system(config)
    assert_propagating(running)
    for name in ("storage", "agent-3"):
        running[name].popen.kill()
        running[name].wait_exit(5)
    supervisor = running["supervisor-1"]
    supervisor.wait_for("storage is unreachable")
    time.sleep(60)  # readiness-free: the outage itself, a minute with storage and agent-3 down
    assert_survived({name: running[name] for name in ("supervisor-1", "supervisor-2", "agent-1", "agent-2")})
    for name in ("storage", "agent-3"):
        running[name] = services.service(config, name)
    running["supervisor-2"].wait_for("agent-3 is back", RESUME_S)
    assert_propagating(running, RESUME_S)
    assert supervisor.count("storage is unreachable") == 1
    assert supervisor.count("storage is back") == 1


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
    assert counts and min(counts) >= 0 and max(counts) <= 20
    assert storage.count(r"^Storage full: 20/20, store refused") >= 1
    # Still storing at the end: nothing froze.
    storage.wait_for(r"^Storage: \d+/20 ", timeout=5, start=len(storage.lines))
    assert_survived(running)
