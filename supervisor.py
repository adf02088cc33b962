"""Supervisor: stores the agents' good samples and tells each agent what room is left.

Each sample above ``confidence`` from its agents goes to ``/update_storage``; the residual
it gets back goes to the agent on ``/update_residual`` (``watch_storage`` wakes one paused).

    python supervisor.py --service-config service_config.json --service-name supervisor-1
"""

from __future__ import annotations

import propagation.startup  # noqa: F401  (first: before gRPC and farm-ng-core load)

import asyncio
import dataclasses

from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.timestamp_pb2 import Timestamp
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from propagation import wire
from propagation.args import arg
from propagation.cli import ServiceSpec, run
from propagation.logs import Tally
from propagation.peers import PeerClient, PeerUnavailable
from propagation.relaying import AgentLink, SampleQueue, SupervisorCounts, batch_residuals, store_outcome
from propagation.residuals import MIN_RESIDUAL_GAP_S
from propagation.serving import create_server, serve


class Supervisor:
    """Relays samples above confidence to storage, and the residuals back to their agents."""

    def __init__(self, service: EventServiceGrpc, spec: ServiceSpec[SupervisorArgs]) -> None:
        self.service = service
        self.args = spec.args
        self.storage = PeerClient(spec.config_of("storage"), service.config.name)
        self.agents = AgentLink.of_subscriptions(spec, service.config.name)  # a client for each agent
        self.counts = SupervisorCounts()
        self.queue = SampleQueue(spec.args.max_batch, self.counts, service.logger)
        self.takes_batches: bool | None = None  # whether storage has /update_storage_batch; None until asked
        self.calls: set[asyncio.Future[None]] = set()  # to agents, under way

    async def watch_agent(self, link: AgentLink) -> None:
        """Reads one agent's ``/sample``: each sample above confidence waits for a relay."""
        async for event, sample in link.agent.subscribe(link.subscription, decode=True):
            self.counts.received += 1
            value = wire.sample_value(sample)
            if value is None:  # a Struct without a number "sample": not a sample of this contract
                self.counts.malformed += 1
            elif value <= self.args.confidence:
                self.counts.below_confidence += 1
            elif link.freshness.too_old(event):  # stuck in a slow link: its residual would be stale
                self.counts.too_old += 1
            else:
                self.queue.put(link, event)

    async def relay(self) -> None:
        """Stores what waits (one sample, or all that queued), then tells each agent the room left."""
        while True:
            await self.store(await self.queue.next_batch())

    async def store(self, batch: list[tuple[AgentLink, Event]]) -> None:
        """The round trip: store the samples, tell each agent the residual its last one left."""
        try:
            outcome = await self.ask_storage(len(batch))
        except PeerUnavailable as exc:  # if the call left, storage may have stored them
            self.counts.unconfirmed += len(batch) if exc.sent else 0
            self.counts.not_stored += 0 if exc.sent else len(batch)
            return
        if outcome is None:  # a storage without batches: one call each
            for item in batch:
                await self.store([item])
            return
        stored, residual, reply = outcome
        self.counts.stored += stored
        self.counts.refused += len(batch) - stored
        for (link, event), left in zip(batch, batch_residuals(stored, residual, len(batch))):
            # farm-ng's example prints str(residual), which is empty for 0: say "value: 0".
            self.service.logger.info("Residual: value: %d", left)
            link.outbox.tell(left, wire.residual_stamps(reply, event))
        for link in {link for link, _ in batch}:
            self.send_residuals(link)

    async def ask_storage(self, items: int) -> tuple[int, int, Event] | None:
        """Stores ``items`` in one call: how many storage stored, the residual after, its reply.

        ``/update_storage`` for one, as the original; ``/update_storage_batch`` for more
        (None if storage does not take batches: farm-ng's original replies ``Empty``).

        Raises:
            PeerUnavailable: no valid reply; ``sent`` says whether storage may have had the call.

        """
        if items > 1 and self.takes_batches is False:
            return None
        if items == 1:
            path, reply = "/update_storage", await self.storage.request_reply("/update_storage", Empty())
        else:
            path = "/update_storage_batch"
            reply = await self.storage.request_reply(path, Int32Value(value=items))
        try:
            message = self.storage.decode_reply(path, reply)
            if path == "/update_storage_batch" and not isinstance(message, Struct):
                self.takes_batches = False
                self.service.logger.info("storage takes no batches: storing one sample per call")
                return None
            stored, residual = store_outcome(path, message, reply.event, items)
        except wire.WrongMessage:  # it had the call: what it did, its reply does not say
            raise PeerUnavailable(self.storage.config.name, sent=True) from None
        if residual < 0:  # farm-ng's original storage counts on past its maximum: no room
            self.counts.negative_residuals += 1
            residual = 0
        return stored, residual, reply.event

    def send_residuals(self, link: AgentLink) -> None:
        """Starts a call for each residual the agent's outbox lets out now (a few at a time)."""
        while (taken := link.outbox.take()) is not None:
            call = asyncio.ensure_future(self.tell(link, *taken))
            self.calls.add(call)
            call.add_done_callback(self.calls.discard)

    async def tell(self, link: AgentLink, residual: int, stamps: list[Timestamp], wake_up: bool) -> None:
        """Tells the agent ``residual`` (``/update_residual``); then the next that waits, if any."""
        try:
            await link.agent.request_reply("/update_residual", Int32Value(value=residual), timestamps=stamps)
        except PeerUnavailable:
            link.outbox.done(None)
            self.counts.unsent += 1
        else:
            link.outbox.done(residual)
            self.counts.wakeups += wake_up
        self.send_residuals(link)

    async def watch_pauses(self, link: AgentLink) -> None:
        """Follows an agent's ``/pauses``: whether it is paused, in its own words."""
        request = SubscribeRequest(uri=Uri(path="/pauses", query=f"service_name={link.name}"), every_n=1)
        async for _, pauses in link.agent.subscribe(request, decode=True):
            paused = dict(pauses).get("paused") if isinstance(pauses, Struct) else None
            if isinstance(paused, bool):
                link.outbox.pauses.reported = paused

    async def watch_storage(self) -> None:
        """Forwards storage's ``/residual``, when it has room, to each agent that may be paused.

        A paused agent publishes nothing: no relay would reach it again. Both facts are
        re-asserted on a period, so this wakes it whatever was lost (``propagation.residuals``).
        """
        request = SubscribeRequest(uri=Uri(path="/residual", query="service_name=storage"), every_n=1)
        clock, last = asyncio.get_running_loop(), 0.0
        flood = Tally(self.service.logger)
        async for event, residual in self.storage.subscribe(request, decode=True):
            if clock.time() - last < MIN_RESIDUAL_GAP_S:
                self.counts.residuals_skipped += 1
                flood.add("skipped %d /residual events that came too soon: storage repeats its room")
                continue
            last = clock.time()
            if isinstance(residual, Int32Value) and residual.value > 0:
                for link in self.agents.values():
                    if link.agent.reachable and link.outbox.may_need_waking():
                        link.outbox.tell(residual.value, wire.residual_stamps(event), wake_up=True)
                        self.send_residuals(link)

    def stats(self) -> dict[str, object]:
        """The figures ``/stats`` carries."""
        peers = [self.storage, *(link.agent for link in self.agents.values())]
        return {
            **dataclasses.asdict(self.counts),
            "superseded": sum(link.outbox.superseded for link in self.agents.values()),
            "confidence": self.args.confidence,
            "max_in_flight": self.args.max_in_flight,
            "max_batch": self.args.max_batch,
            "pending": len(self.queue),
            "agents": list(self.agents),
            "storage_reachable": bool(self.storage.reachable),
            "refused_from_peers": sum(peer.refused for peer in peers),
        }


@dataclasses.dataclass(frozen=True)
class SupervisorArgs:
    """The ``args`` of a supervisor entry in the config."""

    confidence: float = arg(0, 1)
    max_in_flight: int = arg(1, 64, default=8)  # relays under way at once; 1 is one at a time
    max_batch: int = arg(1, 64, default=32)  # samples stored in one call when they queue; at most MAX_PENDING


async def main(spec: ServiceSpec[SupervisorArgs]) -> int:
    """Builds the supervisor's service and serves it until Ctrl-C or SIGTERM."""
    service = EventServiceGrpc(create_server(wire.SUPERVISOR, spec.entries), spec.config)
    supervisor = Supervisor(service, spec)
    links = supervisor.agents.values()
    tasks = [job(link) for link in links for job in (supervisor.watch_agent, supervisor.watch_pauses)]
    tasks += [supervisor.relay() for _ in range(spec.args.max_in_flight)]
    tasks.append(supervisor.watch_storage())
    return await serve(service, tasks, stats=supervisor.stats)


if __name__ == "__main__":
    run(__doc__, SupervisorArgs, main)
