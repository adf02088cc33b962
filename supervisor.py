"""Supervisor: stores the agents' good samples and tells each agent what room is left.

It subscribes to ``/sample`` of every agent its config entry lists. For each sample
above ``confidence`` it calls ``/update_storage`` on the service named ``storage``, logs
the reply (``Residual: value: 455``) and sends that residual to the agent that published
the sample (``/update_residual``). It also follows storage's ``/residual``: when storage
has drained, agents that had paused at 0 hear the new residual at once.

    python supervisor.py --service-config service_config.json --service-name supervisor-1
"""

from __future__ import annotations

import dataclasses

from propagation.cli import ServiceSpec, exit_on_bad_input, run
from propagation.config import arg

DESCRIPTION = "A supervisor of farm-ng-core's service propagation example."


@dataclasses.dataclass(frozen=True)
class SupervisorArgs:
    """The ``args`` of a supervisor entry in the config."""

    confidence: float = arg(0, 1)
    # Relays (store, then tell the agent) under way at once; 1 is one at a time.
    max_in_flight: int = arg(1, 64, default=8)
    # Samples a relay stores in one call when they queue up; 1 is one call each.
    max_batch: int = arg(1, 256, default=32)


if __name__ == "__main__":
    # Bad input gets its one line before gRPC and farm-ng-core load (seconds on a busy machine).
    exit_on_bad_input(DESCRIPTION, SupervisorArgs)

from typing import TYPE_CHECKING  # (every import from here on waits for the check above)

from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service import EventServiceGrpc
from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import Int32Value

from propagation import wire
from propagation.peers import PeerClient, PeerUnavailable, fresh_stream_options
from propagation.relaying import AgentLink, Freshness, Relays
from propagation.serving import create_server, serve

if TYPE_CHECKING:
    from farm_ng.core.timestamp_pb2 import Timestamp


class Supervisor:
    """Relays samples above confidence to storage, and the residuals back to their agents."""

    def __init__(self, service: EventServiceGrpc, spec: ServiceSpec[SupervisorArgs]) -> None:
        self.service = service
        self.confidence = spec.args.confidence
        owner = service.config.name
        # A client for each peer it talks to: storage and the agents it subscribes to.
        self.storage = PeerClient(spec.config_of("storage"), owner)
        self.agents = {
            agent.name: AgentLink(PeerClient(agent, owner, channel_options=fresh_stream_options(agent)), subscription)
            for subscription in service.config.subscriptions
            if (agent := spec.config_of(wire.service_name_of(subscription.uri) or ""))
        }
        self.counts = dict.fromkeys(("received", "below_confidence", "too_old", "stored", "refused"), 0)
        self.counts.update(dict.fromkeys(("malformed", "not_stored", "dropped", "unsent", "wakeups"), 0))
        self.relays = Relays(self, spec.args.max_in_flight, spec.args.max_batch)

    async def watch_agent(self, link: AgentLink) -> None:
        """Reads one agent's ``/sample`` and relays each sample above confidence."""
        freshness = Freshness(link.agent.config.host)
        async for event, sample in link.agent.subscribe(link.subscription, decode=True):
            self.counts["received"] += 1
            link.heard_from()
            value = wire.sample_value(sample)
            if value is None:  # a Struct without a number "sample": not a sample of this contract
                self.counts["malformed"] += 1
            elif value <= self.confidence:
                self.counts["below_confidence"] += 1
            elif freshness.too_old(event):  # stuck in a slow link: its residual would be stale
                self.counts["too_old"] += 1
            else:
                self.relays.put(link, event)

    async def relay(self, link: AgentLink, sample_event: Event) -> None:
        """Stores one sample and tells its agent the room left: the example's round trip."""
        try:
            reply = await self.storage.request_reply("/update_storage", Empty())
            residual = self.storage.decode_reply("/update_storage", reply)
        except (PeerUnavailable, wire.WrongMessage):
            self.counts["not_stored"] += 1
            return
        self.counts["refused" if wire.find_stamp(reply.event, wire.STORE_REFUSED) else "stored"] += 1
        # farm-ng's example prints str(residual), which is empty for 0: say "value: 0".
        self.service.logger.info("Residual: value: %d", residual.value)
        await self.send_residual(link, residual, wire.residual_stamps(reply.event, sample_event))

    async def send_residual(self, link: AgentLink, residual: Int32Value, stamps: list[Timestamp]) -> bool:
        """Tells an agent the residual (``/update_residual``); returns whether it got there."""
        link.told(residual.value, stamps)
        try:
            await link.agent.request_reply("/update_residual", residual, timestamps=stamps)
        except PeerUnavailable:
            self.counts["unsent"] += 1
            link.forget()  # it may have missed anything
            return False
        return True

    async def watch_storage(self) -> None:
        """Wakes paused agents when storage publishes room on ``/residual``.

        An agent paused at 0 publishes nothing, so no relay would ever reach it again;
        storage publishes its residual after each drain instead. In steady state (no
        agent paused) this sends nothing.
        """
        request = SubscribeRequest(uri=Uri(path="/residual", query="service_name=storage"), every_n=1)
        async for event, residual in self.storage.subscribe(request, decode=True):
            if isinstance(residual, Int32Value) and residual.value > 0:
                stamps = [*wire.residual_stamps(event), wire.stamp_now(wire.WAKE_UP)]
                for link in self.agents.values():
                    if link.may_be_paused():
                        self.relays.in_background(self.wake(link, residual, stamps))

    async def wake(self, link: AgentLink, residual: Int32Value, stamps: list[Timestamp]) -> None:
        """Sends a paused (or unknown) agent the residual that lets it resume."""
        if await self.send_residual(link, residual, stamps):
            self.counts["wakeups"] += 1

    def stats(self) -> dict[str, object]:
        """The figures ``/stats`` carries."""
        peers = [self.storage, *(link.agent for link in self.agents.values())]
        return {
            **self.counts,
            "confidence": self.confidence,
            **self.relays.figures(),
            "agents": list(self.agents),
            "storage_reachable": bool(self.storage.reachable),
            "refused_from_peers": sum(peer.refused for peer in peers),
        }


async def main(spec: ServiceSpec[SupervisorArgs]) -> int:
    """Builds the supervisor's service and serves it until Ctrl-C or SIGTERM."""
    service = EventServiceGrpc(create_server(wire.SUPERVISOR), spec.config)
    supervisor = Supervisor(service, spec)
    tasks = [supervisor.watch_agent(link) for link in supervisor.agents.values()]
    tasks += [*supervisor.relays.workers(), supervisor.watch_storage()]
    return await serve(service, tasks, stats=supervisor.stats)


if __name__ == "__main__":
    run(DESCRIPTION, SupervisorArgs, main)
