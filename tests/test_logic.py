"""The example's logic, in-process: residual order, decoding by path, freshness, arithmetic, pacing."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import selectors
import struct
import termios
import time
from typing import Any

import grpc
import pytest
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import EventServiceConfig
from farm_ng.core.stamp import StampSemantics
from farm_ng.core.timestamp_pb2 import Timestamp
from farm_ng.core.uri import make_proto_uri
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation import wire
from propagation.logs import LogOutput
from propagation.pacing import Pacer
from propagation.relaying import Freshness, batch_residuals, batch_result
from storage import Storage, StorageArgs


def test_lines_that_find_the_output_stalled_are_dropped_and_counted() -> None:
    read_end, write_end = os.pipe()
    output = LogOutput(open(write_end, "w", encoding="utf-8"), lines=3)  # noqa: SIM115 (closed below)
    try:
        output.write("x" * (2 * 65536))  # more than a pipe holds: the writer blocks in it
        deadline = time.monotonic() + 10
        while struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0] < 65536:
            assert time.monotonic() < deadline, "the writer did not fill the pipe"
            time.sleep(0.01)  # readiness-free: polls how much the pipe holds, bounded
        for number in range(10):
            output.write(f"line {number}")  # three wait in the queue, the rest find it full
        text = b""
        while b"line 2\n" not in text:
            readable, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, text[-200:]
            text += os.read(read_end, 65536)
        assert text.endswith(b"WARNING: 7 log lines dropped while the output was blocked\nline 0\nline 1\nline 2\n")
    finally:
        output.close()
        os.close(read_end)


def event_of(path: str, message: Any, query: str | None = None) -> Event:
    uri = make_proto_uri(path, message)
    if query is not None:
        uri.query = query
    return Event(uri=uri)


def test_decode_by_path() -> None:
    residual = Int32Value(value=7)
    assert wire.decode(event_of("/update_residual", residual), residual.SerializeToString(), Int32Value) == residual
    # An Empty's payload is a valid Int32Value 0: the type the sender named decides.
    with pytest.raises(wire.WrongMessage, match=r"carries google\.protobuf\.Int32Value, not google\.protobuf\.Empty"):
        wire.decode(event_of("/update_residual", Empty()), b"", Int32Value)
    with pytest.raises(wire.WrongMessage, match=r"not x\.abort"):
        wire.decode(event_of("/update_residual", residual, "type=x.abort&pb=os"), b"", Int32Value)
    with pytest.raises(wire.WrongMessage, match="payload is not a valid"):
        wire.decode(event_of("/update_residual", residual), b"\xff\xff\xff", Int32Value)
    # The right type from another module: farm-ng-core would import the module pb= names.
    with pytest.raises(wire.WrongMessage, match="is not defined in 'this'"):
        wire.decode(event_of("/update_residual", residual, "type=google.protobuf.Int32Value&pb=this"), b"", Int32Value)
    without_scheme = event_of("/update_residual", residual)
    without_scheme.uri.scheme = ""
    with pytest.raises(wire.WrongMessage, match="not an unnamed type"):
        wire.decode(without_scheme, b"", Int32Value)
    with pytest.raises(wire.WrongMessage, match="not an unnamed type"):
        wire.decode(Event(uri=Uri(path="/sample", query="broken")), b"", Struct)
    assert isinstance(wire.decode(event_of("/update_storage_batch", Empty()), b"", (Struct, Empty)), Empty)


def sample(sent: float, received: float, sequence: int = 0) -> Event:
    return Event(
        sequence=sequence,
        timestamps=[
            Timestamp(stamp=sent, clock_name="agent-host/monotonic", semantics=StampSemantics.SERVICE_SEND),
            Timestamp(stamp=received, clock_name="supervisor-host/monotonic", semantics=StampSemantics.CLIENT_RECEIVE),
        ],
    )


def test_freshness_compares_delays_not_clocks() -> None:
    freshness = Freshness()  # an agent on another host
    offset = 12345.0  # the two hosts' clocks differ by this much: it cancels
    assert not freshness.too_old(sample(1.0, 1.0 + offset + 0.002, 1))
    assert not freshness.too_old(sample(2.0, 2.0 + offset + 0.3, 2))  # 0.3 s more than the best
    assert freshness.too_old(sample(3.0, 3.0 + offset + 0.7, 3))  # waited 0.7 s in a buffer
    assert freshness.too_old(sample(50.0, 50.0 + offset + 0.7, 4))  # a link that stays slow stays slow
    # The best delay of the last 60 s is the reference.
    assert not freshness.too_old(sample(70.0, 70.0 + offset + 0.7, 5))
    # The agent restarted on a rebooted host: its clock starts again, and so does the reference.
    assert not freshness.too_old(sample(0.5, 80.0 + offset, 0))
    assert not freshness.too_old(Event())  # no stamps: nothing to judge
    # On loopback no link holds samples back: a late one is this machine's stall.
    local = Freshness(applies=False)
    assert not local.too_old(sample(1.0, 1.002, 1))
    assert not local.too_old(sample(3.0, 3.7, 2))


def test_batch_result_is_checked() -> None:
    def reply(**fields: Any) -> Struct:
        result = Struct()
        result.update(fields)
        return result

    assert batch_result(reply(stored=3, residual=7), 4) == (3, 7)
    # Below 0: farm-ng's original storage counts on past its maximum; the relay takes it as no room.
    assert batch_result(reply(stored=3, residual=-1), 4) == (3, -1)
    for bad in (
        reply(stored=3),
        reply(stored="3", residual=7),
        reply(stored=2.5, residual=7),
        reply(stored=float("nan"), residual=7),
        reply(stored=5, residual=7),  # more than the batch
        reply(stored=3, residual=-(2**31)),
        reply(stored=3, residual=2**31),  # no Int32Value
    ):
        with pytest.raises(wire.WrongMessage):
            batch_result(bad, 4)


def test_batch_residuals() -> None:
    # Storage had 10 left, stored 3 of 5 (full after 3): the items left 9, 8, 7, then 7, 7.
    assert batch_residuals(stored=3, residual=7, items=5) == [9, 8, 7, 7, 7]
    assert batch_residuals(stored=4, residual=0, items=4) == [3, 2, 1, 0]
    assert batch_residuals(stored=0, residual=0, items=2) == [0, 0]


def test_store_arithmetic() -> None:
    async def scenario() -> tuple[list[int], dict[str, int], int]:
        config = EventServiceConfig(name="storage", port=1, host="localhost")
        storage = Storage(EventServiceGrpc(grpc.aio.server(), config), StorageArgs(max_storage=5, batch_size=2))
        stored = [storage.store(1), storage.store(3), storage.store(4), storage.store(1)]
        return stored, storage.counts, storage.count

    stored, counts, count = asyncio.run(scenario())
    assert stored == [1, 3, 1, 0]
    assert count == 5
    assert (counts["accepted"], counts["refused"]) == (5, 4)


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, with nothing ready, moves a virtual clock on by the timeout instead of waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready and timeout:
            self.now += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to its next timer: timing is exact, whatever the machine's load."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def pace(rate: float, num_tasks: int, pauses: list[tuple[float, float]], run_s: float) -> list[tuple[int, float]]:
    """(task, when) of each publish of a ``Pacer``'s tasks, the room closed ``(after, for)`` each pause.

    On a virtual clock: each publish happens when the pacer asks for it, to the microsecond.
    """

    async def scenario() -> list[tuple[int, float]]:
        pacer = Pacer(rate, num_tasks)  # in the loop: before 3.10 an asyncio.Event binds to one
        published: list[tuple[int, float]] = []
        loop = asyncio.get_running_loop()

        async def task(task_id: int) -> None:
            async for _ in pacer.slots(task_id):
                published.append((task_id, loop.time()))

        tasks = [asyncio.ensure_future(task(task_id)) for task_id in range(pacer.num_tasks)]
        started = loop.time()
        for after, length in pauses:
            await asyncio.sleep(max(0.0, started + after - loop.time()))
            pacer.room.clear()
            await asyncio.sleep(length)
            pacer.room.set()
        await asyncio.sleep(max(0.0, started + run_s - loop.time()))
        for each in tasks:
            each.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return [(task_id, moment - started) for task_id, moment in published]

    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_tasks_keep_their_turns_after_pauses() -> None:
    # Pauses shorter than a period, as with a small storage: some tasks wait one out,
    # others sleep through it. Each must keep its own slot on the shared grid: task i
    # at i/4 of each 100 ms period. A task that restarted its schedule when a pause
    # ended would publish 10 to 50 ms off its slot from then on.
    rate, num_tasks = 10, 4
    published = pace(rate, num_tasks, [(0.31, 0.035), (0.52, 0.04), (0.83, 0.03)], run_s=1.6)
    period = 1 / rate
    for task_id in range(num_tasks):
        slot = task_id * period / num_tasks
        # How late each publish after the pauses was for its slot: on the virtual clock,
        # not at all (floating point aside).
        moments = [moment for who, moment in published if who == task_id and moment > 1.0]
        late = [(moment - slot + period / 2) % period - period / 2 for moment in moments]
        assert len(late) >= 5, published
        assert all(abs(each) < 1e-6 for each in late), (task_id, [round(1000 * each) for each in late])
