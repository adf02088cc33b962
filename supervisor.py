"""Supervisor: stores the agents' good samples and tells each agent what room is left.

It subscribes to ``/sample`` of every agent its config entry lists. For each sample
above ``confidence`` it calls ``/update_storage`` on the service named ``storage``,
logs the reply (``Residual: value: 455``) and sends that residual to the agent that
published the sample (``/update_residual``). It also follows storage's ``/residual``:
when storage has drained, agents that had paused at 0 hear the new residual at once.

    python supervisor.py --service-config service_config.json --service-name supervisor-1
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Awaitable
from urllib.parse import parse_qs

from farm_ng.core.event_service_pb2 import SubscribeRequest
from farm_ng.core.events_file_reader import payload_to_protobuf
from farm_ng.core.stamp import StampSemantics
from farm_ng.core.uri_pb2 import Uri
from google.protobuf.empty_pb2 import Empty
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import Int32Value

from service_runtime import (
    RESIDUAL_TIME,
    SAMPLE_PUBLISHED,
    STORE_REFUSED,
    ConfigError,
    PeerClient,
    PeerUnavailable,
    check_endpoint,
    find_service,
    find_stamp,
    is_newer,
    publish_every,
    require,
    run_service,
)

if TYPE_CHECKING:
    from farm_ng.core.event_pb2 import Event
    from farm_ng.core.event_service import EventServiceGrpc
    from farm_ng.core.timestamp_pb2 import Timestamp

    from service_runtime import ServiceSpec

STORAGE_NAME = "storage"
# Seconds a call to storage or to an agent may take before it counts as failed.
CALL_TIMEOUT_S = 1.0
# Samples waiting for a free relay slot. Past this the supervisor is overloaded: a
# longer queue would only make the residuals it relays older, so the sample is
# counted as dropped instead.
MAX_PENDING = 64


@dataclasses.dataclass(frozen=True)
class SupervisorArgs:
    """The ``args`` of a supervisor entry in the config."""

    confidence: float
    # Relays (store, then tell the agent) under way at once; 1 is one at a time.
    max_in_flight: int = 8
    # Samples a relay stores in one call when they queue up; 1 is one call each.
    max_batch: int = 32

    def __post_init__(self) -> None:
        require(0 <= self.confidence <= 1, "confidence", self.confidence, "in [0, 1]")
        require(self.max_in_flight >= 1, "max_in_flight", self.max_in_flight, ">= 1")
        require(self.max_batch >= 1, "max_batch", self.max_batch, ">= 1")


@dataclasses.dataclass
class AgentLink:
    """One supervised agent: its subscription, its client, what it was last told."""

    subscription: SubscribeRequest
    client: PeerClient
    # The residual it was last sent, and storage's stamp on it; None when unknown.
    residual: int | None = None
    residual_time: Timestamp | None = None


def agent_links(service: EventServiceGrpc, spec: ServiceSpec) -> dict[str, AgentLink]:
    """The agents the config entry subscribes to, each with a client.

    Raises:
        ConfigError: a subscription is not an agent's ``/sample`` in the config.

    """
    links: dict[str, AgentLink] = {}
    for subscription in service.config.subscriptions:
        query = parse_qs(subscription.uri.query)
        names = query.get("service_name", [])
        where = f"service {service.config.name!r}: subscription {subscription.uri.path}?{subscription.uri.query}"
        if subscription.uri.path != "/sample" or len(names) != 1:
            msg = f"{where} must be /sample with service_name=<agent>"
            raise ConfigError(msg)
        try:
            config = find_service(spec.config_list, names[0])
        except ConfigError as exc:
            msg = f"{where}: {exc}"
            raise ConfigError(msg) from None
        check_endpoint(config)
        links[config.name] = AgentLink(subscription, PeerClient(config, service.config.name))
    return links


class Supervisor:
    """Relays samples above confidence to storage and residuals back to agents."""

    def __init__(self, service: EventServiceGrpc, spec: ServiceSpec, args: SupervisorArgs) -> None:
        self._service = service
        self._log = service.logger
        self._confidence = args.confidence
        self.max_in_flight = args.max_in_flight
        self.max_batch = args.max_batch
        # Whether storage offers /update_storage_batch; None until a batch asks.
        self._storage_takes_batches: bool | None = None
        self.agents = agent_links(service, spec)
        storage_config = find_service(spec.config_list, STORAGE_NAME)
        check_endpoint(storage_config)
        self.storage = PeerClient(storage_config, service.config.name)
        self._pending: asyncio.Queue[tuple[AgentLink, Event]] = asyncio.Queue(MAX_PENDING)
        self.counts = dict.fromkeys(
            ("received", "below_confidence", "stored", "refused", "not_stored", "dropped", "unsent", "wakeups"), 0
        )
        self._overloaded = False

    async def watch_agent(self, link: AgentLink) -> None:
        """Reads one agent's samples and queues those above confidence."""
        async for event, message in link.client.subscribe(link.subscription, decode=True):
            self.counts["received"] += 1
            if not isinstance(message, Struct) or "sample" not in message:
                continue
            if message["sample"] <= self._confidence:
                self.counts["below_confidence"] += 1
                continue
            try:
                self._pending.put_nowait((link, event))
            except asyncio.QueueFull:
                self.counts["dropped"] += 1
                if not self._overloaded:
                    self._overloaded = True
                    self._log.warning("overloaded: dropping samples that cannot be relayed in time (counted)")

    async def relay_worker(self) -> None:
        """Relays what is queued, up to ``max_batch`` samples at a time.

        ``max_in_flight`` of these run at once. Under light load each takes one sample;
        when samples queue up, storing them in one call costs far less than one call each.
        """
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self.max_batch and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            await self.relay(batch)
            if self._overloaded and self._pending.empty():
                self._overloaded = False
                self._log.info("caught up: dropped %d samples so far", self.counts["dropped"])

    async def relay(self, batch: list[tuple[AgentLink, Event]]) -> None:
        """Stores samples and tells each agent the residual its last sample left."""
        residuals, storage_time = await self.store(len(batch))
        self.counts["not_stored"] += len(batch) - len(residuals)
        latest: dict[str, tuple[AgentLink, int, Event]] = {}
        for (link, sample_event), residual in zip(batch, residuals):
            # farm-ng's example prints str(residual), which is empty for 0: say "value: 0".
            self._log.info("Residual: value: %d", residual)
            latest[link.client.config.name] = (link, residual, sample_event)
        await asyncio.gather(
            *(
                self.send_residual(link, Int32Value(value=residual), stamps_of(storage_time, sample_event))
                for link, residual, sample_event in latest.values()
            )
        )

    async def store(self, items: int) -> tuple[list[int], Timestamp | None]:
        """Stores ``items`` samples: the residual after each, and storage's stamp on them.

        Fewer residuals than items means the rest could not be stored (storage down).
        Uses ``/update_storage_batch`` for several items when storage offers it.
        """
        if items > 1 and self._storage_takes_batches is not False:
            try:
                reply = await self.storage.request_reply(
                    "/update_storage_batch", Int32Value(value=items), timeout=CALL_TIMEOUT_S
                )
            except PeerUnavailable:
                return [], None
            result = payload_to_protobuf(reply.event, reply.payload)
            if isinstance(result, Struct):
                self._storage_takes_batches = True
                stored, residual = int(result["stored"]), int(result["residual"])
                self.counts["stored"] += stored
                self.counts["refused"] += items - stored
                # The i-th stored item left residual + (stored - 1 - i); refused ones, residual.
                return [residual + max(stored - 1 - index, 0) for index in range(items)], find_stamp(
                    reply.event, RESIDUAL_TIME
                )
            self._storage_takes_batches = False  # farm-ng's original storage: Empty for unknown paths
            self._log.info("storage takes no batches: storing one sample per call")
        residuals: list[int] = []
        storage_time = None
        for _ in range(items):
            try:
                reply = await self.storage.request_reply("/update_storage", Empty(), timeout=CALL_TIMEOUT_S)
            except PeerUnavailable:
                break
            residual = payload_to_protobuf(reply.event, reply.payload)
            if not isinstance(residual, Int32Value):
                break
            self.counts["refused" if find_stamp(reply.event, STORE_REFUSED) else "stored"] += 1
            residuals.append(residual.value)
            storage_time = find_stamp(reply.event, RESIDUAL_TIME)
        return residuals, storage_time

    async def send_residual(self, link: AgentLink, residual: Int32Value, stamps: list[Timestamp]) -> bool:
        """Tells an agent the residual; returns whether it got there.

        The link records the residual before the call: a drain that arrives while a 0
        is on its way must see that the agent is about to pause, and wake it.
        """
        stamp = next((stamp for stamp in stamps if stamp.semantics == RESIDUAL_TIME), None)
        if stamp is None or is_newer(stamp, link.residual_time):
            link.residual, link.residual_time = residual.value, stamp
        try:
            await link.client.request_reply("/update_residual", residual, timestamps=stamps, timeout=CALL_TIMEOUT_S)
        except PeerUnavailable:
            self.counts["unsent"] += 1
            link.residual = link.residual_time = None  # it may have missed anything
            return False
        return True

    async def watch_storage(self) -> None:
        """Wakes paused agents when storage publishes room on ``/residual``.

        An agent paused at 0 publishes nothing, so no relay would ever reach it again;
        storage publishes its residual after each drain instead. In steady state (no
        agent paused) this sends nothing.
        """
        request = SubscribeRequest(uri=Uri(path="/residual", query=f"service_name={STORAGE_NAME}"), every_n=1)
        waking: set[asyncio.Future[None]] = set()
        async for event, message in self.storage.subscribe(request, decode=True):
            if not isinstance(message, Int32Value) or message.value <= 0:
                continue
            stamps = [stamp for stamp in (find_stamp(event, RESIDUAL_TIME),) if stamp]
            for link in self.agents.values():
                if link.residual is None or link.residual <= 0:
                    # In the background: an agent that does not answer must not hold
                    # up the others, nor this subscription.
                    waking.add(asyncio.ensure_future(self.wake(link, message, stamps)))
            waking = {future for future in waking if not future.done()}

    async def wake(self, link: AgentLink, residual: Int32Value, stamps: list[Timestamp]) -> None:
        """Sends a paused (or unknown) agent the residual that lets it resume."""
        if await self.send_residual(link, residual, stamps):
            self.counts["wakeups"] += 1

    def stats(self) -> dict[str, Any]:
        """The figures ``/stats`` carries."""
        return {
            **self.counts,
            "confidence": self._confidence,
            "max_in_flight": self.max_in_flight,
            "max_batch": self.max_batch,
            "pending": self._pending.qsize(),
            "storage_reachable": bool(self.storage.reachable),
        }


def stamps_of(storage_time: Timestamp | None, sample_event: Event) -> list[Timestamp]:
    """The stamps a residual carries to an agent.

    When storage computed it (to order residuals), and when the agent published the
    sample behind it (to measure the propagation latency).
    """
    return [stamp for stamp in (storage_time, published_stamp(sample_event)) if stamp is not None]


def published_stamp(sample_event: Event) -> Timestamp | None:
    """When the agent published a sample (its monotonic send stamp), relabelled.

    The agent subtracts it from the time the residual arrives: that is the
    propagation latency.
    """
    for stamp in sample_event.timestamps:
        if stamp.semantics == StampSemantics.SERVICE_SEND and stamp.clock_name.endswith("/monotonic"):
            relabelled = type(stamp)()
            relabelled.CopyFrom(stamp)
            relabelled.semantics = SAMPLE_PUBLISHED
            return relabelled
    return None


def start(service: EventServiceGrpc, spec: ServiceSpec, args: SupervisorArgs) -> list[Awaitable[Any]]:
    """Builds the supervisor and returns what it runs beside the server."""
    supervisor = Supervisor(service, spec, args)
    watchers = [supervisor.watch_agent(link) for link in supervisor.agents.values()]
    workers = [supervisor.relay_worker() for _ in range(args.max_in_flight)]
    return [*watchers, *workers, supervisor.watch_storage(), publish_every(service, "/stats", supervisor.stats)]


if __name__ == "__main__":
    sys.exit(run_service("A supervisor of farm-ng-core's service propagation example.", SupervisorArgs, start))
