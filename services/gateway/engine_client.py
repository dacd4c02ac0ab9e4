"""Asyncio client for the scheduler: a zmq.asyncio DEALER per scheduler address.

One background task per connection receives every frame and routes it: ``RequestOutputs`` go to
the per-request ``asyncio.Queue``, ``RequestError`` ends that request's stream with an
``EngineError``, ``SchedulerStats`` resolves the pending ``stats()`` call.

A socket monitor per connection tracks whether its scheduler is up. When the connection drops
(the scheduler died), every stream in flight there ends with ``EngineError("engine_unavailable")``
(the gateway answers 503) and new requests go elsewhere or get that error at once. The DEALER
reconnects by itself; a restarted scheduler knows none of the old requests, which were all ended
here, so request ids never straddle two scheduler lives.

Several addresses may be given (one gateway fronting several schedulers, ``--data-parallel-size``):
``routing.Router`` picks the engine of a new request (by default the one that was sent its prompt's
longest prefix, else the one with the fewest running + waiting requests in its last stats), and
the request stays there (aborts are routed by request id). Sockets are created lazily inside the
running event loop, so an app can be built in one thread and served by uvicorn in another.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional, Sequence

import zmq
import zmq.asyncio

from shared.messages import (
    AbortRequest, AddRequest, GrammarSpec, ProtocolError, RequestError, RequestOutput, RequestOutputs,
    SamplingParams, SchedulerStats, StatsRequest, decode, encode,
)
from shared import transport
from shared.transport import check_address
from services.gateway.routing import Router

log = logging.getLogger("pagedserve.gateway")


class EngineError(Exception):
    """The scheduler refused or failed a request (``code`` from ``RequestError``)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


_END = object()  # queue sentinel: the request was aborted by this gateway
UNAVAILABLE = "engine_unavailable"


class _Connection:
    """One DEALER to one scheduler ROUTER."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str):
        self.addr = addr
        self.sock, self.monitor = transport.monitored_dealer(ctx, addr)
        self.up = asyncio.Event()     # connected to a live scheduler
        self.ever_up = False
        if addr.startswith("inproc://"):  # no monitor events in-process: assume up
            self.up.set()
        self.last_stats: Optional[SchedulerStats] = None
        self.stats_time = 0.0
        self.stats_waiter: Optional[asyncio.Future] = None
        self.num_active = 0           # requests this gateway has in flight here
        self.life = 0                 # disconnects seen: a new life has an empty prefix cache
        self.recv_task: Optional[asyncio.Task] = None
        self.monitor_task: Optional[asyncio.Task] = None

    def load(self) -> int:
        s = self.last_stats
        return self.num_active if s is None else max(self.num_active, s.num_running + s.num_waiting)


class _Stream:
    def __init__(self, conn: _Connection, n: int):
        self.conn, self.queue = conn, asyncio.Queue()
        self.unfinished = set(range(n))


class EngineClient:
    def __init__(self, addrs: str | Sequence[str], stats_ttl: float = 0.5, stats_timeout: float = 2.0,
                 connect_timeout: float = 2.0, routing: str = "prefix"):
        self.router = Router(routing)
        self.addrs = [check_address(a) for a in ([addrs] if isinstance(addrs, str) else addrs)]
        if not self.addrs:
            raise ValueError("at least one scheduler address is needed")
        self.stats_ttl, self.stats_timeout = stats_ttl, stats_timeout
        self.connect_timeout = connect_timeout    # how long a request waits for a scheduler to be up
        self._conns: list[_Connection] = []
        self._streams: dict[str, _Stream] = {}
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._pending_sends: set[asyncio.Future] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._conns:
            return
        self._ctx = zmq.asyncio.Context()
        self._conns = [_Connection(self._ctx, a) for a in self.addrs]
        loop = asyncio.get_running_loop()
        for c in self._conns:
            c.recv_task = loop.create_task(self._recv_loop(c))
            c.monitor_task = loop.create_task(self._monitor_loop(c))

    async def close(self) -> None:
        for c in self._conns:
            for task in (c.recv_task, c.monitor_task):
                if task:
                    task.cancel()
        for c in self._conns:
            transport.close_monitored(c.sock, c.monitor)
        self._conns = []
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- API -----------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return len(self._streams)

    async def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                  grammar: Optional[GrammarSpec] = None,
                  cache_salt: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and wait for its first reply.

        Raises ``EngineError`` right away when the scheduler refuses it (queue_full, too_long,
        not_ready, invalid); otherwise returns an iterator over its outputs that ends once every
        sample has finished (or the request was aborted here).
        """
        self._ensure_started()
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        conn = await self._pick_connection(prompt_ids, cache_salt)
        stream = self._streams[request_id] = _Stream(conn, sampling.n)
        conn.num_active += 1
        try:
            await conn.sock.send(encode(AddRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                                   sampling=sampling, arrival_time=time.time(),
                                                   grammar=grammar, cache_salt=cache_salt)))
            first = await stream.queue.get()
        except BaseException:
            self.abort_nowait(request_id)
            raise
        if isinstance(first, EngineError):
            self._forget(request_id)
            raise first
        return self._iterate(request_id, stream, first)

    async def _iterate(self, request_id: str, stream: _Stream, item) -> AsyncIterator[RequestOutput]:
        """Outputs until every sample finished. Closed early (consumer stopped, cancelled,
        client gone), it aborts the request at the scheduler."""
        ended = False
        try:
            while True:
                if item is _END:
                    ended = True
                    return
                if isinstance(item, EngineError):
                    ended = True
                    raise item
                if item.finish_reason is not None:
                    stream.unfinished.discard(item.index)
                ended = not stream.unfinished      # the last output: closing after it aborts nothing
                yield item
                if ended:
                    return
                item = await stream.queue.get()
        finally:
            if ended:
                self._forget(request_id)
            else:
                self.abort_nowait(request_id)

    async def abort(self, request_id: str, sample_index: Optional[int] = None) -> None:
        self.abort_nowait(request_id, sample_index)

    def abort_nowait(self, request_id: str, sample_index: Optional[int] = None) -> None:
        """Tell the scheduler to drop the request and end its local stream. Never awaits, so it
        is safe in ``finally`` blocks of cancelled tasks (client disconnects).

        With ``sample_index``, only that sample of an n > 1 request stops (a stop string ended
        it): the stream goes on for the others and ends once they finished; the scheduler's
        "abort" finish for the sample may still come through it. Stopping the last unfinished
        sample aborts the whole request."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if sample_index is not None:
            if sample_index not in stream.unfinished:
                return
            if len(stream.unfinished) > 1:
                stream.unfinished.discard(sample_index)
                self._send_nowait(stream.conn, AbortRequest(request_id=request_id, sample_index=sample_index))
                return
        self._forget(request_id)
        stream.queue.put_nowait(_END)
        self._send_nowait(stream.conn, AbortRequest(request_id=request_id))

    def _send_nowait(self, conn: _Connection, msg) -> None:
        """Queue a frame without awaiting; the send future is kept until it completes."""
        fut = conn.sock.send(encode(msg))
        if not fut.done():
            self._pending_sends.add(fut)
            fut.add_done_callback(self._pending_sends.discard)

    async def stats(self) -> SchedulerStats:
        """Aggregate SchedulerStats over the schedulers (each cached for ``stats_ttl`` seconds)."""
        self._ensure_started()
        results = await asyncio.gather(*(self._stats_of(c) for c in self._conns))
        return _merge_stats(results)

    def last_stats(self) -> SchedulerStats:
        """The latest stats without asking, merged over the schedulers."""
        return _merge_stats([c.last_stats or SchedulerStats() for c in self._conns])

    def engine_stats(self) -> list[tuple[str, SchedulerStats]]:
        """(engine label, its latest stats) per scheduler, labelled "0".."N-1" in address order
        (for the metrics collector: every series carries its engine)."""
        if not self._conns:
            return [(str(i), SchedulerStats()) for i in range(len(self.addrs))]
        return [(str(i), c.last_stats or SchedulerStats()) for i, c in enumerate(self._conns)]

    def engine_of(self, request_id: str) -> str:
        """The engine label of a request in flight ("" once it is gone)."""
        stream = self._streams.get(request_id)
        return "" if stream is None else str(self._conns.index(stream.conn))

    # -- internals ---------------------------------------------------------------------------

    async def _pick_connection(self, prompt_ids: list[int], cache_salt: Optional[str]) -> _Connection:
        """The router's choice among the connections whose scheduler is up; waits
        ``connect_timeout`` for one (start-up, a scheduler restarting), else
        ``EngineError(engine_unavailable)``."""
        up = [c for c in self._conns if c.up.is_set()]
        if not up:
            waits = [asyncio.ensure_future(c.up.wait()) for c in self._conns]
            try:
                await asyncio.wait(waits, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            up = [c for c in self._conns if c.up.is_set()]
            if not up:
                raise EngineError(UNAVAILABLE, "no scheduler is reachable; retry shortly")
        if len(self._conns) == 1:
            return up[0]
        # an engine whose scheduler is up but whose executor is not (loading, recovering) would
        # answer not_ready: route around it while another engine is ready
        ready = [c for c in up if c.last_stats is None or c.last_stats.executor_ready] or up
        block_size = max((c.last_stats.block_size for c in self._conns if c.last_stats), default=0)
        loads = [c.load() if c in ready else None for c in self._conns]
        return self._conns[self.router.pick(loads, [c.life for c in self._conns], prompt_ids, block_size,
                                            cache_salt)]

    def _on_disconnect(self, conn: _Connection) -> None:
        """The scheduler behind ``conn`` is gone, with every request it held: end their streams."""
        conn.up.clear()
        conn.last_stats = None
        conn.life += 1
        lost = [rid for rid, st in self._streams.items() if st.conn is conn]
        if lost:
            log.error("scheduler at %s disconnected; ending %d requests", conn.addr, len(lost))
        error = EngineError(UNAVAILABLE, "the scheduler went away; retry the request")
        for rid in lost:
            self._streams[rid].queue.put_nowait(error)
            self._forget(rid)
        if conn.stats_waiter is not None and not conn.stats_waiter.done():
            conn.stats_waiter.set_result(SchedulerStats(executor_ready=False))

    async def _monitor_loop(self, conn: _Connection) -> None:
        while True:
            event = transport.connection_event(await conn.monitor.recv_multipart())
            if event == zmq.EVENT_CONNECTED:
                if not conn.up.is_set():
                    log.info("connected to scheduler at %s", conn.addr)
                conn.up.set()
                conn.ever_up = True
            elif event == zmq.EVENT_DISCONNECTED and conn.up.is_set():
                self._on_disconnect(conn)

    def _forget(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.conn.num_active -= 1

    async def _stats_of(self, conn: _Connection) -> SchedulerStats:
        if not conn.up.is_set():
            if conn.ever_up:                  # known to be down: answer at once
                return SchedulerStats(executor_ready=False)
            try:                              # starting up: give the connection a moment
                await asyncio.wait_for(conn.up.wait(), self.connect_timeout)
            except asyncio.TimeoutError:
                return SchedulerStats(executor_ready=False)
        if conn.last_stats is not None and time.monotonic() - conn.stats_time < self.stats_ttl:
            return conn.last_stats
        if conn.stats_waiter is None or conn.stats_waiter.done():
            conn.stats_waiter = asyncio.get_running_loop().create_future()
            await conn.sock.send(encode(StatsRequest()))
        try:
            return await asyncio.wait_for(asyncio.shield(conn.stats_waiter), self.stats_timeout)
        except asyncio.TimeoutError:
            log.warning("scheduler at %s did not answer a stats request", conn.addr)
            conn.stats_waiter = None
            return SchedulerStats(executor_ready=False)

    async def _recv_loop(self, conn: _Connection) -> None:
        while True:
            frame = await conn.sock.recv()
            try:
                msg = decode(frame)
            except ProtocolError as e:
                log.error("bad frame from scheduler %s: %s", conn.addr, e)
                continue
            if isinstance(msg, RequestOutputs):
                for out in msg.outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:  # else aborted here: late outputs are dropped
                        stream.queue.put_nowait(out)
            elif isinstance(msg, RequestError):
                stream = self._streams.get(msg.request_id)
                if stream is not None:
                    stream.queue.put_nowait(EngineError(msg.code, msg.message))
            elif isinstance(msg, SchedulerStats):
                conn.last_stats, conn.stats_time = msg, time.monotonic()
                if conn.stats_waiter is not None and not conn.stats_waiter.done():
                    conn.stats_waiter.set_result(msg)
            else:
                log.error("unexpected %s from scheduler %s", type(msg).__name__, conn.addr)


def _merge_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    if len(stats) == 1:
        return stats[0]
    total = SchedulerStats()
    for name in ("num_running", "num_waiting", "num_swapped", "num_blocks", "num_free_blocks",
                 "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
                 "generation_tokens"):
        setattr(total, name, sum(getattr(s, name) for s in stats))
    used = sum(s.kv_cache_usage * s.num_blocks for s in stats)
    total.kv_cache_usage = used / total.num_blocks if total.num_blocks else 0.0
    total.executor_ready = any(s.executor_ready for s in stats)
    total.max_model_len = min((s.max_model_len for s in stats if s.max_model_len), default=0)
    total.block_size = max((s.block_size for s in stats), default=0)
    return total
