"""The scheduler's side of the executor connection: a DEALER to the executor's ROUTER.

A *lost* executor (its connection drops: a socket monitor sees EVENT_DISCONNECTED within
milliseconds of a kill on ipc:// and tcp://; ZMTP heartbeats catch a silent peer on tcp://; no
reply within the step timeout is the last resort) raises ExecutorLost from ``execute``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Protocol

import zmq

from shared import transport
from shared.config import ConfigError
from shared.messages import (
    ExecutorError, ExecutorHello, ExecutorReady, ProtocolError, Shutdown, StepMasks, StepPlan, StepResult,
    encode,
)

MaskSource = Callable[[], StepMasks]

log = logging.getLogger("pagedserve.scheduler")


class ExecutorChannel(Protocol):
    def hello(self, block_size: int, timeout_s: float) -> Optional[ExecutorReady]: ...
    # may raise ExecutorLost; ``masks`` (a plan sent without them) is called once the plan is out
    def execute(self, plan: StepPlan, masks: Optional[MaskSource] = None) -> StepResult | ExecutorError: ...
    def forget(self, block_size: int, timeout_s: float) -> bool: ...   # a hello now; False: no answer
    def lost(self) -> bool: ...
    def reset(self) -> None: ...          # after a loss: a fresh connection, no stale replies
    def shutdown(self) -> None: ...
    def close(self) -> None: ...


class ExecutorLost(Exception):
    """The executor's connection dropped (process died, host gone): its KV cache is lost."""


class ExecutorTimeout(ExecutorLost):
    """No reply from the executor within the step timeout."""


HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000


class ZmqExecutorChannel:
    """DEALER to the executor's ROUTER; one request in flight. Stale replies (an ExecutorReady
    answering an earlier hello, a result for another step) are skipped.

    A socket monitor reports the connection dropping; ``execute`` raises ExecutorLost as soon as
    it does and ``lost()`` tells an idle loop. ZMTP heartbeats make a silent tcp peer drop too."""

    def __init__(self, ctx: zmq.Context, addr: str, hello_interval: float = 1.0, step_timeout: float = 300.0):
        self.ctx, self.addr = ctx, addr
        self.hello_interval, self.step_timeout = hello_interval, step_timeout
        self._connect()

    def _connect(self) -> None:
        self.sock, self.monitor = transport.monitored_dealer(self.ctx, self.addr,
                                                             (HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS))
        self._connected = False
        self._last_hello = -float("inf")

    def _disconnected(self) -> bool:
        """Consume monitor events; whether the connection dropped since it was last up."""
        dropped = False
        while self.monitor.poll(0):
            event = transport.connection_event(self.monitor.recv_multipart())
            if event == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED and self._connected:
                self._connected, dropped = False, True
        return dropped

    def lost(self) -> bool:
        """Non-blocking: whether the executor's connection dropped since the last call."""
        return self._disconnected()

    def hello(self, block_size: int, timeout_s: float) -> Optional[ExecutorReady]:
        self._disconnected()                          # drops before the handshake change nothing
        now = time.monotonic()
        if now - self._last_hello >= self.hello_interval:
            try:       # never block the loop: hellos queue while the executor loads (it binds when ready)
                self.sock.send(encode(ExecutorHello(block_size=block_size)), zmq.NOBLOCK)
            except zmq.Again:
                pass
            self._last_hello = now
        deadline = now + timeout_s
        while True:
            if not self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                return None
            msg = self._recv()
            if isinstance(msg, ExecutorReady):
                return msg
            if isinstance(msg, ExecutorError):        # e.g. a block size mismatch: retrying cannot help
                raise ConfigError(f"the executor refused the handshake: {msg.message}")

    def forget(self, block_size: int, timeout_s: float) -> bool:
        """A hello now (whatever the handshake interval), so the executor drops every sequence;
        whether its ExecutorReady came within ``timeout_s``."""
        self._last_hello = -float("inf")
        return self.hello(block_size, timeout_s) is not None

    def execute(self, plan: StepPlan, masks: Optional[MaskSource] = None) -> StepResult | ExecutorError:
        """Send the plan and wait for its result. With ``masks``, the plan went without its token
        masks: they are computed now, while the executor runs the forward pass, and follow it."""
        transport.send(self.sock, plan)
        if masks is not None:
            transport.send(self.sock, masks())
        deadline = time.monotonic() + self.step_timeout
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(int(left * 1000))) if left > 0 else {}
            if self.sock not in ready:              # a reply that made it wins over the drop
                if self.monitor in ready and self._disconnected():
                    raise ExecutorLost(f"the executor disconnected during step {plan.step_id}")
                if ready:
                    continue
                raise ExecutorTimeout(f"no reply to step {plan.step_id} within {self.step_timeout:g}s")
            msg = self._recv()
            if isinstance(msg, (StepResult, ExecutorError)) and msg.step_id in (plan.step_id, -1):
                return msg
            if isinstance(msg, ExecutorReady):     # the answer to a hello that queued while it loaded
                log.debug("skipping a late ExecutorReady while waiting for step %d", plan.step_id)
            else:
                log.warning("skipping unexpected %s from the executor while waiting for step %d",
                            type(msg).__name__, plan.step_id)

    def _recv(self):
        try:
            return transport.recv(self.sock)
        except ProtocolError as e:
            log.error("bad frame from the executor: %s", e)
            return None

    def reset(self) -> None:
        """A fresh socket, so replies meant for the old conversation cannot arrive."""
        self.close()
        self._connect()

    def shutdown(self) -> None:
        transport.send(self.sock, Shutdown())

    def close(self) -> None:
        transport.close_monitored(self.sock, self.monitor)

