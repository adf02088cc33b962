"""Each role on its own, driven by a test client."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fakes import PlainAgent
from farm_ng.core.timestamp_pb2 import Timestamp
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import Int32Value
from helpers import Services, collect, request, requests, stats, write_config

from propagation.wire import RESIDUAL_TIME, SAMPLE_PUBLISHED, find_stamp


def test_storage_counts_replies_and_drains(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=100", "batch_size=5"]}})
    storage = services.service(config, "storage")
    residuals = [request(config, "storage", "/update_storage", Empty()) for _ in range(7)]
    values = [Int32Value.FromString(reply.payload).value for reply in residuals]
    # The drain may remove a batch between two stores; between drains, each store
    # leaves one less.
    assert values[0] == 99
    assert all(later in (earlier - 1, earlier - 1 + 5) for earlier, later in zip(values, values[1:])), values
    storage.wait_for(r"^Storage: 1/100 \(99 remaining\)$")
    storage.wait_for(r"^Removed from storage: 5/100$")
    # 7 stored, one batch of 5 drained: 2 left, and no second batch.
    figures = stats(config, "storage")
    assert (figures["count"], figures["drained"], figures["accepted"]) == (2, 5, 7)
    reply = request(config, "storage", "/update_storage", Empty())
    assert Int32Value.FromString(reply.payload).value == 97


def test_storage_publishes_residual_latched(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=50", "batch_size=10"]}})
    services.service(config, "storage")
    ((_, residual),) = collect(config, "storage", "/residual", 1)
    assert residual.value == 50


def test_agent_publishes_pauses_and_resumes(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"agent-1": {"args": ["rate=50", "num_tasks=3"]}})
    agent = services.service(config, "agent-1")
    samples = [message for _, message in collect(config, "agent-1", "/sample", 30)]
    assert {int(sample["task_id"]) for sample in samples} == {0, 1, 2}
    assert all(0 <= sample["sample"] < 1 for sample in samples)
    agent.wait_for(r"^Published sample 0\.\d+ from task [012]$")

    request(config, "agent-1", "/update_residual", Int32Value(value=0))
    agent.wait_for(r"^Remainder: 0$")
    paused = stats(config, "agent-1")
    assert paused["paused"] is True
    # A second /stats a second later: nothing was published meanwhile.
    assert stats(config, "agent-1")["published"] == paused["published"]

    request(config, "agent-1", "/update_residual", Int32Value(value=455))
    agent.wait_for(r"^Remainder: 455$")
    resumed = stats(config, "agent-1")
    assert resumed["paused"] is False
    assert resumed["published"] > paused["published"]


def relayed_sample_stamps(agent: PlainAgent) -> list[float]:
    """The publish stamps of the samples whose residuals reached ``agent``."""
    stamps = (find_stamp(event, SAMPLE_PUBLISHED) for event, _ in agent.residuals)
    return [stamp.stamp for stamp in stamps if stamp is not None]


def test_supervisor_relays_samples_above_confidence_to_their_agent(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"supervisor-1": {"args": ["confidence=0.6"]}})
    services.service(config, "storage")
    supervisor = services.service(config, "supervisor-1")
    plan = {"agent-1": [0.1, 0.7, 0.3, 0.9, 0.61, 0.6], "agent-2": [0.65, 0.2, 0.95]}

    async def scenario() -> dict[str, tuple[dict[float, float], list[float]]]:
        async with PlainAgent(config, "agent-1") as agent_1, PlainAgent(config, "agent-2") as agent_2:
            agents = {"agent-1": agent_1, "agent-2": agent_2}
            sent = {name: await asyncio.wait_for(agents[name].publish(values), 10) for name, values in plan.items()}
            last_above = {name: max(stamp for stamp, value in sent[name].items() if value > 0.6) for name in plan}
            heard: dict[str, list[float]] = {}
            for _ in range(100):  # up to 10 s
                heard = {name: relayed_sample_stamps(agent) for name, agent in agents.items()}
                if all(last_above[name] in heard[name] for name in plan):
                    break
                await asyncio.sleep(0.1)  # readiness-free: polls what the agents heard, 100 times at most
        return {name: (sent[name], heard[name]) for name in plan}

    # Every sample above confidence is stored (a "Residual:" line each); its agent hears the
    # newest residual (one call to an agent at a time: a newer residual replaces one waiting).
    for name, (sent, heard) in asyncio.run(scenario()).items():
        relayed = {sent[stamp] for stamp in heard}
        above = [value for value in plan[name] if value > 0.6]
        assert relayed <= set(above), name
        assert above[-1] in relayed, name
    assert supervisor.count(r"^Residual: value: \d+$") == 5


def test_concurrent_stores_never_pass_max_storage(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=20", "batch_size=20"]}})
    storage = services.service(config, "storage")
    replies = requests(config, "storage", "/update_storage", [Empty() for _ in range(200)])
    assert all(0 <= reply.value <= 19 for reply in replies)
    counts = [int(m.group(1)) for m in storage.matches(r"^Storage: (\d+)/20 ")]
    assert counts and max(counts) <= 20
    figures = stats(config, "storage")
    assert figures["accepted"] + figures["refused"] == 200
    assert figures["refused"] > 0
    assert storage.count(r"^Storage full: 20/20, store refused") == figures["refused"]


def test_agent_never_applies_an_older_residual(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    agent = services.service(config, "agent-3")

    def residual_at(value: int, when: float | None) -> None:
        stamps = [Timestamp(stamp=when, clock_name="storage-host/monotonic", semantics=RESIDUAL_TIME)] if when else []
        request(config, "agent-3", "/update_residual", Int32Value(value=value), timestamps=stamps)

    residual_at(5, 2.0)
    residual_at(0, 1.0)  # overtaken: storage said 5 after it said 0
    residual_at(4, 3.0)
    agent.wait_for(r"^Remainder: 4$")
    assert agent.count(r"^Remainder: ") == 2
    figures = stats(config, "agent-3")
    assert (figures["remainder"], figures["stale_residuals"], figures["paused"]) == (4, 1, False)
    residual_at(9, None)  # farm-ng's original supervisor sends no stamp: always applied
    agent.wait_for(r"^Remainder: 9$")


def test_agent_sequence_numbers_are_unique_and_increasing(services: Services, tmp_path: Path) -> None:
    # farm-ng-core reads and bumps its counter around an await: ten tasks publishing
    # at once would share numbers unless the agent serializes its publishes.
    config = write_config(tmp_path, {"agent-1": {"args": ["rate=100", "num_tasks=10"], "log_level": "WARNING"}})
    services.service(config, "agent-1", wait=False)
    sequences = [event.sequence for event, _ in collect(config, "agent-1", "/sample", 500)]
    assert all(earlier < later for earlier, later in zip(sequences, sequences[1:])), sequences


def test_storage_stores_batches_up_to_its_room(services: Services, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"storage": {"args": ["max_storage=20", "batch_size=20"]}})
    storage = services.service(config, "storage")
    request(config, "storage", "/update_storage", Empty())
    (reply,) = requests(config, "storage", "/update_storage_batch", [Int32Value(value=30)])
    assert dict(reply) == {"stored": 19, "refused": 11, "residual": 0}
    storage.wait_for(r"^Storage: 20/20 \(0 remaining\)$")
    storage.wait_for(r"^Storage full: 20/20, 11 stores refused \(11 refused\)$")
    figures = stats(config, "storage")
    assert figures["accepted"] + figures["refused"] == 31
