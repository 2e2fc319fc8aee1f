"""Receives a vLLM engine's KV cache events over ZMQ and hands them on in order.

Wire format (vLLM 0.32, ``vllm/distributed/kv_events.py``, ``ZmqEventPublisher``): every
``KVEventBatch`` is one three-frame message on a PUB socket: the topic, the batch's
sequence number as 8 bytes big-endian (0, 1, 2, ... per publisher process) and the
msgpack payload, decoded here with ``kv_events.decode_batch``.

Who binds follows vLLM's own rule (``ZmqEventPublisher._is_bind_endpoint``): an endpoint
containing ``*`` or ``::``, or an ``ipc://`` / ``inproc://`` one, is bound by vLLM, so the
subscriber connects to it (a ``*`` host becomes 127.0.0.1, ``[::]`` becomes ``[::1]``: the
agent runs beside its engine). Any other tcp endpoint, such as ``tcp://127.0.0.1:5557``,
is one vLLM's PUB *connects* to, so the subscriber binds it. That is the better set-up:
the socket exists before vLLM does, and vLLM's PUB reconnects (every 100 ms) after a
restart of either side.

Order and gaps. Batches reach the sink in sequence order, each once. When a number is
skipped (the PUB dropped messages at its high-water mark, or the subscriber connected
late) and a replay endpoint is configured, the missing range is fetched from vLLM's
replay socket and delivered before the newer batch. Replay protocol (vLLM's
``_service_replay``): vLLM binds a ROUTER; a DEALER sends ``[b"", start_seq]`` (8 bytes
big-endian) and gets ``[b"", topic, seq, payload]`` for every batch still in vLLM's
buffer (its last ``buffer_steps`` batches) with ``seq >= start_seq``, then the end
marker ``[b"", b"", (-1).to_bytes(8, "big", signed=True), b""]``. What replay cannot
supply stays a gap: the sink sees the jump in numbers and must assume lost history
(``BlockTracker`` then treats the cache as cleared). A number lower than expected
means the publisher restarted (a new vLLM process numbers from 0 again); such a batch
is delivered as is, and the sink sees numbers go back.

Malformed messages (wrong frame count, a sequence frame that is not 8 bytes, a payload
that does not decode) are logged, counted and skipped; they never stop the loop. A
batch that does not decode is lost history like any other gap, but is not requested
again through replay. An exception raised by the sink is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvfleet.node_agent.kv_events import KVEventBatch, decode_batch

log = logging.getLogger(__name__)

BatchSink = Callable[[int, KVEventBatch], None]
"""Receives ``(seq, batch)`` with the publisher's own sequence number."""

END_SEQ = (-1).to_bytes(8, "big", signed=True)   # vLLM's end-of-replay marker
_HWM = 100_000                                   # vLLM's default PUB high-water mark, in messages


def publisher_binds(endpoint: str) -> bool:
    """True if vLLM's PUB binds ``endpoint`` (so a subscriber connects): vLLM's own rule."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def connect_address(endpoint: str) -> str:
    """The address to connect to for an endpoint that vLLM binds (wildcards become loopback)."""
    return endpoint.replace("*", "127.0.0.1").replace("[::]", "[::1]")


@dataclass(slots=True)
class SubscriberStats:
    """Monotonic counters since ``start``."""

    received: int = 0      # messages read from the SUB socket
    delivered: int = 0     # batches handed to the sink (live and replayed)
    replayed: int = 0      # of those, batches that came through replay
    malformed: int = 0     # messages skipped because they did not parse
    missed: int = 0        # batch numbers never delivered (gaps replay could not fill)
    restarts: int = 0      # times the numbering went back (a new publisher process)


class KVEventSubscriber:
    """One engine's event stream: a SUB socket, optional replay, a sink called in order.

    The sink runs on the event loop thread, between two reads of the socket.
    """

    def __init__(
        self,
        endpoint: str,
        sink: BatchSink,
        *,
        topic: str = "",
        replay_endpoint: str | None = None,
        replay_timeout_s: float = 1.0,
    ) -> None:
        """``endpoint`` and ``replay_endpoint`` are spelled as in vLLM's ``--kv-events-config``.

        ``topic`` is vLLM's ``topic`` (default empty: every topic). ``replay_timeout_s``
        is how long one replay may stay silent before the gap is left as it is, seconds.
        """
        self._configured = endpoint
        self._sink = sink
        self._topic = topic.encode()
        self._replay_endpoint = connect_address(replay_endpoint) if replay_endpoint else None
        self._replay_timeout_s = replay_timeout_s
        self._bind = not publisher_binds(endpoint)
        self.endpoint = endpoint if self._bind else connect_address(endpoint)
        self.stats = SubscriberStats()
        self._next: int | None = None          # the sequence number expected next
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._peers = 0
        self._connected = asyncio.Event()

    @property
    def last_seq(self) -> int | None:
        """Sequence number of the last batch delivered (or skipped as malformed); None before any."""
        return None if self._next is None else self._next - 1

    @property
    def connected(self) -> bool:
        """True while at least one publisher has completed its ZMTP handshake with us."""
        return self._connected.is_set()

    async def start(self) -> None:
        """Binds or connects the SUB socket and starts reading. Raises zmq.ZMQError if
        the endpoint cannot be bound (in use, bad address)."""
        if self._sub is not None:
            return
        self._ctx = zmq.asyncio.Context()
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, _HWM)
        if "[" in self.endpoint:
            sub.setsockopt(zmq.IPV6, 1)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        try:
            if self._bind:
                sub.bind(self.endpoint)
                self.endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)   # resolves port 0
            else:
                sub.connect(self.endpoint)
        except zmq.ZMQError:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            self._ctx.term()
            self._ctx = None
            raise
        self._sub = sub
        self._tasks = [
            asyncio.create_task(self._run(), name=f"kv-events:{self.endpoint}"),
            asyncio.create_task(self._watch(monitor), name=f"kv-events-monitor:{self.endpoint}"),
        ]
        log.info("KV events: %s %s (topic %r, replay %s)", "bound" if self._bind else "connected to",
                 self.endpoint, self._topic.decode(), self._replay_endpoint or "off")

    async def wait_connected(self, timeout_s: float) -> bool:
        """Waits until a publisher is connected, at most ``timeout_s`` seconds; returns whether one is.

        A completed handshake means the subscription is on its way to the publisher;
        a batch published in the next instant (well under a millisecond on loopback)
        can still miss it.
        """
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self._connected.clear()

    # ------------------------------------------------------------------ reading

    async def _run(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart(copy=True)
            self.stats.received += 1
            try:
                await self._on_message(frames)
            except asyncio.CancelledError:
                raise
            except Exception:   # a bug here must not end the stream
                log.exception("KV events from %s: failed to handle a message", self.endpoint)

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self._malformed(f"{len(frames)} frames, expected 3 (topic, seq, payload)")
            return
        topic, seq_bytes, payload = frames
        if self._topic and topic != self._topic:
            return   # a longer topic that only shares our prefix
        if len(seq_bytes) != 8:
            self._malformed(f"sequence frame of {len(seq_bytes)} bytes, expected 8")
            return
        seq = int.from_bytes(seq_bytes, "big")
        expected = self._next
        if expected is not None and seq > expected and self._replay_endpoint is not None:
            await self._replay(expected, seq)
        batch = self._decode(seq, payload)
        expected = self._next
        if expected is not None and seq > expected:
            self.stats.missed += seq - expected
            log.warning("KV events from %s: batches %d..%d lost%s", self.endpoint, expected, seq - 1,
                        " (replay could not supply them)" if self._replay_endpoint else "")
        elif expected is not None and seq < expected:
            self.stats.restarts += 1
            log.info("KV events from %s: numbering went from %d back to %d (publisher restarted)",
                     self.endpoint, expected - 1, seq)
        self._next = seq + 1
        if batch is not None:
            self._deliver(seq, batch)

    def _decode(self, seq: int, payload: bytes) -> KVEventBatch | None:
        try:
            return decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed(f"batch {seq} does not decode: {exc}")
            return None

    def _deliver(self, seq: int, batch: KVEventBatch) -> None:
        self.stats.delivered += 1
        try:
            self._sink(seq, batch)
        except Exception:
            log.exception("KV events from %s: the sink failed on batch %d", self.endpoint, seq)

    def _malformed(self, why: str) -> None:
        self.stats.malformed += 1
        log.warning("KV events from %s: skipped a malformed message: %s", self.endpoint, why)

    # ------------------------------------------------------------------ replay

    async def _replay(self, start: int, stop: int) -> None:
        """Fetches batches ``start .. stop-1`` from vLLM's replay socket and delivers, in
        order, those it still holds. Newer ones it sends too are dropped: they are
        queued on the SUB socket already. A fresh DEALER per replay, so a reply that
        arrives after a timeout cannot be mistaken for the next replay's."""
        assert self._ctx is not None and self._replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if "[" in self._replay_endpoint:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(self._replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(self._replay_timeout_s * 1000, zmq.POLLIN):
                    log.warning("KV events: replay from %s timed out after %.1f s", self._replay_endpoint,
                                self._replay_timeout_s)
                    return
                frames = await sock.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    self._malformed(f"replay reply of {len(frames)} frames")
                    continue
                _, _topic, seq_bytes, payload = frames
                if seq_bytes == END_SEQ:
                    return
                seq = int.from_bytes(seq_bytes, "big")
                assert self._next is not None
                if seq < self._next or seq >= stop:
                    continue
                if seq > self._next:
                    self.stats.missed += seq - self._next   # gone from vLLM's buffer too
                batch = self._decode(seq, payload)
                self._next = seq + 1
                if batch is not None:
                    self.stats.replayed += 1
                    self._deliver(seq, batch)
        finally:
            sock.close(linger=0)

    # ------------------------------------------------------------------ connection state

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._peers += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    # Also sent for peers that never finished a handshake: clamp at zero.
                    self._peers = max(0, self._peers - 1)
                if self._peers:
                    self._connected.set()
                else:
                    self._connected.clear()
        finally:
            monitor.close(linger=0)
