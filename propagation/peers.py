"""``PeerClient``: a client of one peer service, with farm-ng-core's ``EventClient`` calls.

``request_reply`` and ``subscribe`` take what ``EventClient``'s take, on one long-lived
channel (farm-ng-core 2.3.2's ``EventClient`` builds one per call and per received message),
each call bounded by ``timeout`` (``EventClient`` waits without bound for a peer that is
down), replies and events decoded by their path (``wire``), never by the type the peer
names. A silent subscription or a missed deadline, with nothing heard on the connection for
``LIVENESS_S``, makes it ask the peer for its URIs; unanswered, a new connection replaces the
old one: a host that vanished (no reset, no FIN) is noticed in seconds, not when TCP gives
up, and a slow link that still delivers is left alone. Why: docs/farm-ng-core-workarounds.md
and docs/networks.md. It uses farm-ng-core's public pieces only (stub, URIs, stamps).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Sequence

import grpc
from farm_ng.core.event_pb2 import Event
from farm_ng.core.event_service_pb2 import ListUrisRequest, RequestReplyReply, RequestReplyRequest
from farm_ng.core.event_service_pb2_grpc import EventServiceStub
from farm_ng.core.stamp import StampSemantics, get_monotonic_now, get_system_clock_now
from farm_ng.core.uri import make_proto_uri

from propagation.logs import Tally
from propagation.network import MAX_MESSAGE_BYTES, grpc_address
from propagation.wire import PUBLISHED, REPLIES, WrongMessage, decode, shown

if TYPE_CHECKING:
    from farm_ng.core.event_service_pb2 import EventServiceConfig, SubscribeRequest
    from farm_ng.core.timestamp_pb2 import Timestamp
    from google.protobuf.message import Message

# Seconds a call may take before it counts as failed.
CALL_TIMEOUT_S = 1.0
# A subscription silent this long is checked: does the peer still answer?
LIVENESS_S = 2.0
# How long a liveness check waits for the peer's answer.
PROBE_TIMEOUT_S = 1.0
# After a stream ends, before the next one: a peer that closes streams at once is not
# spun on.
RESUBSCRIBE_PAUSE_S = 0.1
# What a server answers when it will not serve a subscription (the path guard's codes),
# as opposed to being down: tried again only every LIVENESS_S.
REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # gRPC's reconnect backoff grows to 120 s by default: a peer back after a minute would
    # go unnoticed for tens of seconds; capped at 1 s, one attempt a second while it is down.
    # The "min" backoff is in fact the connect timeout (20 s by default): 1 s gives up on a
    # vanished host, and leaves a slow link time for its handshake.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A new channel after a dead connection must make a new connection: by default
    # channels to one address share them.
    ("grpc.use_local_subchannel_pool", 1),
)

# For a stream that must stay fresh (a supervisor reading an agent's samples): at most about
# 1 kB runs ahead of what the receiver has read. Why, and why not on loopback: docs/networks.md,
# "A thin link".
FRESH_STREAM_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))


class PeerUnavailable(Exception):
    """A call to a peer failed: it is down, restarting, or did not answer in time.

    ``sent``: whether the peer may have had the call (it left on a ready connection and no
    valid reply came back); a call that found no ready connection never left.
    """

    def __init__(self, peer: str, sent: bool = False) -> None:
        super().__init__(peer)
        self.sent = sent


class _Connection:
    """One channel to the peer, and the calls under way on it.

    A connection found dead is retired: new calls get a new one, and the channel closes
    once its last call has ended (closing it under a call would cancel that call, which
    its caller could not tell from being cancelled itself).
    """

    def __init__(self, address: str, options: list[tuple[str, Any]]) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = EventServiceStub(self.channel)
        self._calls = 0
        self.retired = False  # found dead: no new calls
        self.heard = -LIVENESS_S  # when something last came from the peer on it (monotonic)

    def lively(self) -> bool:
        """Whether something came on it in the last ``LIVENESS_S``: a slow link is not a dead one."""
        return time.monotonic() - self.heard < LIVENESS_S

    @contextlib.asynccontextmanager
    async def call(self) -> AsyncIterator[EventServiceStub]:
        """The stub, for one call (or one stream, or one wait for readiness)."""
        self._calls += 1
        try:
            yield self.stub
        finally:
            self._calls -= 1
            if self.retired and self._calls == 0:
                await self.channel.close(None)


class PeerClient:
    """A client of one peer: one channel, bounded calls, liveness, calls named as farm-ng-core's."""

    def __init__(
        self,
        config: EventServiceConfig,
        owner: str,
        timeout: float = CALL_TIMEOUT_S,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """A client of the peer of ``config``, for the service ``owner`` (in its log lines); it connects on first use.

        Each call may take ``timeout`` seconds; ``channel_options`` come besides ``CHANNEL_OPTIONS``.
        """
        self.config = config
        self.timeout = timeout
        self.server_address = grpc_address(config.host, config.port)  # as gRPC reads it
        self._log = logging.getLogger(owner)
        self._tally = Tally(self._log)
        self._options = [*CHANNEL_OPTIONS, *channel_options]
        self._connection: _Connection | None = None
        # As EventClient's: a request's sequence counts the calls on its path.
        self._sequences: defaultdict[str, Iterator[int]] = defaultdict(itertools.count)
        self.reachable: bool | None = None  # whether the last call reached the peer; None before the first
        self._ever_reached = False
        self.refused = 0  # replies and events not of their path's type

    def _current(self) -> _Connection:
        if self._connection is None:
            self._connection = _Connection(self.server_address, self._options)
        return self._connection

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.channel.close(None)

    async def request_reply(
        self, path: str, message: Message, timestamps: list[Timestamp] | None = None, decode: bool = False
    ) -> RequestReplyReply | Message:
        """Sends a request and returns the reply, within the client's ``timeout`` seconds.

        Args:
            path: The request's path, e.g. ``/update_storage``.
            message: The request's message.
            timestamps: Extra timestamps to carry in the request's event.
            decode: Return the reply's message, decoded as its path's reply type,
                instead of the raw ``RequestReplyReply``.

        Raises:
            PeerUnavailable: the peer is down, did not answer in time, or replied with
                a message its path does not carry.

        """
        stamps = list(timestamps or [])
        stamps.append(get_monotonic_now(semantics=StampSemantics.CLIENT_SEND))
        stamps.append(get_system_clock_now(semantics=StampSemantics.CLIENT_SEND))
        uri = make_proto_uri(path=path, message=message)
        uri.query += f"&service_name={self.config.name}"
        payload = message.SerializeToString()
        event = Event(uri=uri, timestamps=stamps, payload_length=len(payload), sequence=next(self._sequences[path]))
        connection = self._current()
        deadline = asyncio.get_running_loop().time() + self.timeout
        async with connection.call() as stub:
            # A call leaves only on a ready connection: one that failed before is known not to have.
            if not await self._connected(connection):
                raise PeerUnavailable(self.config.name)
            try:
                reply: RequestReplyReply = await stub.requestReply(
                    RequestReplyRequest(event=event, payload=payload),
                    timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                )
            except grpc.aio.AioRpcError as exc:
                # A missed deadline: packets may be vanishing, or the link is slow. If nothing came
                # on the connection lately and the peer does not answer a probe, a new one replaces
                # it (calls would queue behind the dead one). One already replaced may be closed.
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._mark_down(connection, _rpc_reason(exc))
                elif connection is self._connection and not connection.lively():
                    await self._answers(connection, _rpc_reason(exc))
                raise PeerUnavailable(self.config.name, sent=True) from None
        connection.heard = time.monotonic()
        self._mark_up(connection)
        reply.event.timestamps.append(get_monotonic_now(semantics=StampSemantics.CLIENT_RECEIVE))
        if not decode:
            return reply
        try:
            return self.decode_reply(path, reply)
        except WrongMessage:
            raise PeerUnavailable(self.config.name, sent=True) from None

    def decode_reply(self, path: str, reply: RequestReplyReply) -> Message:
        """The message of a reply to ``path``, decoded as that path's reply type.

        Raises:
            WrongMessage: the reply is not of a type ``path`` replies with (counted).

        """
        try:
            return decode(reply.event, reply.payload, REPLIES.get(path, ()))
        except WrongMessage as exc:
            self._refuse(f"replies to {path}", exc)
            raise

    async def subscribe(
        self, request: SubscribeRequest, decode: bool = True
    ) -> AsyncIterator[tuple[Event, Message | bytes]]:
        """Yields the events of one path, across the peer's restarts, until cancelled.

        With ``decode``, each message is decoded as its path's type (an event of a path
        this example does not know comes as bytes); one that is not is counted and
        skipped. While the peer is down it waits quietly for it to come back.
        """
        while True:
            connection = self._current()
            pause = RESUBSCRIBE_PAUSE_S
            async with connection.call() as stub:
                if not await self._connected(connection):
                    continue
                call = stub.subscribe(request)
                first = True
                try:
                    while (reply := await self._next_reply(call, connection)) is not None:
                        if first:  # later messages may be old ones still buffered
                            self._mark_up(connection)
                            first = False
                        reply.event.timestamps.append(get_monotonic_now(StampSemantics.CLIENT_RECEIVE))
                        message = self._decode_event(reply) if decode else reply.payload
                        if message is not None:
                            yield reply.event, message
                except grpc.aio.AioRpcError as exc:
                    if (code := exc.code()) in REFUSALS:
                        path = shown(request.uri.path)
                        self._tally.add(f"{self.config.name}: %d subscription(s) to {path} refused ({code.name})")
                        self._log.debug("%s: %s", self.config.name, exc.details())
                        pause = LIVENESS_S  # it may change its mind; not soon
                    else:
                        self._mark_down(connection, _rpc_reason(exc))
                finally:
                    call.cancel()
            # Outside the call: a connection retired meanwhile closes without waiting for it.
            await asyncio.sleep(pause)

    async def _connected(self, connection: _Connection) -> bool:
        """Whether ``connection`` is ready, or gets ready within ``timeout``; if not, the peer is down."""
        if connection.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return True
        try:
            await asyncio.wait_for(connection.channel.channel_ready(), self.timeout)
        except asyncio.TimeoutError:
            self._mark_down(connection, "no connection")
            return False
        except grpc.aio.UsageError:  # closed meanwhile by close()
            return False
        return True

    async def _next_reply(self, call: Any, connection: _Connection) -> Any:
        """The stream's next reply; None if it ended or the peer no longer answers.

        A subscription may be silent for good reasons (a paused agent publishes nothing): only
        silence on the whole connection makes the client check that the peer answers at all.
        """
        reading = asyncio.ensure_future(call.read())
        try:
            while True:
                done, _ = await asyncio.wait([reading], timeout=LIVENESS_S)
                if done:
                    reply = reading.result()
                    connection.heard = time.monotonic()
                    return None if reply is grpc.aio.EOF else reply
                if connection.lively():
                    continue
                if not await self._answers(connection, "no answer"):
                    return None
                self._mark_up(connection)  # silent, but it answers
        finally:
            reading.cancel()

    async def _answers(self, connection: _Connection, why: str) -> bool:
        """Whether the peer answers a ``listUris`` on ``connection`` in time; if not, it is down and is reconnected."""
        async with connection.call() as stub:
            try:
                await stub.listUris(ListUrisRequest(), timeout=PROBE_TIMEOUT_S)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError):  # UsageError: its channel was closed
                self._mark_down(connection, why)
                if self._connection is connection:  # the next call makes a new one; this closes after its last
                    self._connection = None
                    connection.retired = True
                return False
        connection.heard = time.monotonic()
        return True

    def _decode_event(self, reply: Any) -> Message | bytes | None:
        kind = PUBLISHED.get(reply.event.uri.path)
        if kind is None:
            return reply.payload  # a path of another program: its bytes
        try:
            return decode(reply.event, reply.payload, kind)
        except WrongMessage as exc:
            self._refuse(f"events of {reply.event.uri.path}", exc)
            return None

    def _refuse(self, what: str, exc: WrongMessage) -> None:
        self.refused += 1
        self._tally.add(f"{self.config.name}: refused %d {what} that were not of their path's type")
        self._log.debug("%s: %s", self.config.name, exc)

    # Up and down: only the current connection tells, not a retired one (an old call that
    # ends after a heal, say).

    def _mark_up(self, connection: _Connection) -> None:
        """Records that the peer answered on ``connection``; says so if it had been down."""
        if connection is not self._connection or self.reachable:
            return
        again = "is back" if self._ever_reached else "is up"
        self._log.info("%s %s at %s", self.config.name, again, self.server_address)
        self.reachable = self._ever_reached = True

    def _mark_down(self, connection: _Connection, why: str) -> None:
        """Records a failed call on ``connection``; says so once per outage."""
        if connection is not self._connection or self.reachable is False:
            return
        self.reachable = False
        if self._ever_reached:
            self._log.warning("%s is unreachable at %s (%s); retrying", self.config.name, self.server_address, why)
        else:  # not started yet: services may start in any order
            self._log.info("%s is not up yet at %s; retrying", self.config.name, self.server_address)


def _rpc_reason(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()  # never None: AioRpcError is built with one
    return "no answer in time" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name.lower()
