"""`pagedserve scheduler`: the Scheduler behind ZeroMQ. Pure CPU, never imports torch.

Sockets (shared/transport.py): a ROUTER bound at ``--gateway-addr`` that any number of gateways
connect to, and a DEALER connected to the executor's ROUTER at ``--executor-addr``.

Life of the loop (``SchedulerService.run_once``):
  * until the executor is ready, send ``ExecutorHello`` every ``--hello-interval`` seconds and
    answer gateways meanwhile (AddRequest -> RequestError "not_ready", stats with
    ``executor_ready=False``); the first ``ExecutorReady`` sizes the cache and builds the Scheduler;
  * drain the gateway socket (without blocking when there is work, else block up to
    ``idle_timeout``): AddRequest, AbortRequest (the whole request, or with ``sample_index`` one
    sample, whose finish "abort" is streamed back), StatsRequest; a bad frame gets RequestError
    ``invalid`` with ``request_id=""`` and the loop goes on;
  * one step: ``schedule()`` -> StepPlan to the executor -> StepResult -> ``update()`` -> one
    RequestOutputs per gateway identity.

An executor error (ExecutorError, or a reply ``update`` rejects) fails, with RequestError
``executor_error``, every request that has state on the executor or in the failed plan; waiting
requests stay queued. The failed plan changed nothing on the executor while the Scheduler
believes it did, so the next plan is reconciled: its drop lists keep only ids the executor holds,
plus every id it still holds (all of them belong to failed requests).

A *lost* executor (its connection drops: a socket monitor sees EVENT_DISCONNECTED within
milliseconds of a kill on ipc:// and tcp://; ZMTP heartbeats catch a silent peer on tcp://; no
reply within ``--step-timeout`` is the last resort) takes its KV cache with it. The service goes
back to the handshake on a fresh socket, keeps accepting requests, and when a (restarted)
executor is ready, ``Scheduler.reset_for_new_executor`` re-sizes the pool from its ExecutorReady
and requeues every sequence for recompute: in-flight requests finish, continuing after the last
token they streamed. If no executor is ready within ``--recovery-timeout`` every request fails
with ``executor_error``, so none hangs.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional, Protocol

import msgspec
import zmq

from services.scheduler.scheduler import Scheduler
from shared import transport
from shared.config import CacheConfig, ConfigError, SchedulerConfig
from shared.messages import (
    AbortRequest, AddRequest, ExecutorError, ExecutorHello, ExecutorReady, ProtocolError, RequestError,
    RequestOutput, RequestOutputs, SchedulerStats, Shutdown, StatsRequest, StepPlan, StepResult, encode,
)

log = logging.getLogger("pagedserve.scheduler")


# ------------------------------------------------------------------------------ executor channel


class ExecutorChannel(Protocol):
    def hello(self, block_size: int, timeout_s: float) -> Optional[ExecutorReady]: ...
    def execute(self, plan: StepPlan) -> StepResult | ExecutorError: ...   # may raise ExecutorLost
    def lost(self) -> bool: ...
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

    def execute(self, plan: StepPlan) -> StepResult | ExecutorError:
        transport.send(self.sock, plan)
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


class LocalChannel:
    """An in-process executor (anything with ``ready()`` and ``execute(plan)``), no sockets."""

    def __init__(self, executor):
        self.executor = executor

    def hello(self, block_size: int, timeout_s: float) -> Optional[ExecutorReady]:
        return self.executor.ready()

    def execute(self, plan: StepPlan) -> StepResult | ExecutorError:
        return self.executor.execute(plan)

    def lost(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ the service


def _sized(sched: SchedulerConfig, cache: CacheConfig, ready: ExecutorReady) -> tuple[SchedulerConfig, CacheConfig]:
    """Fill the 0 = "the executor's" values from the handshake; ConfigError on a mismatch."""
    if ready.block_size != cache.block_size:
        raise ConfigError(f"--block-size {cache.block_size} but the executor uses {ready.block_size}")
    for name, mine, theirs in (("num-blocks", cache.num_blocks, ready.num_blocks),
                               ("num-host-blocks", cache.num_host_blocks, ready.num_host_blocks)):
        if mine > theirs:
            raise ConfigError(f"--{name} {mine} but the executor has only {theirs}")
    max_len = ready.max_model_len if sched.max_model_len == 0 else min(sched.max_model_len, ready.max_model_len)
    if sched.max_model_len > ready.max_model_len:
        log.warning("--max-model-len %d exceeds the executor's %d; using %d",
                    sched.max_model_len, ready.max_model_len, max_len)
    cache = replace(cache, num_blocks=cache.num_blocks or ready.num_blocks,
                    num_host_blocks=cache.num_host_blocks or ready.num_host_blocks)
    return replace(sched, max_model_len=max_len).validate(), cache.validate()


@dataclass
class _Owned:
    identity: bytes
    unfinished: set[int]         # sample indices without a finish_reason yet


class SchedulerService:
    """The scheduler's event loop. ``sched_config.max_model_len`` and ``cache_config.num_blocks``
    / ``num_host_blocks`` may be 0: the executor's values are taken at the handshake."""

    def __init__(self, sched_config: SchedulerConfig, cache_config: CacheConfig, gateway: zmq.Socket,
                 channel: ExecutorChannel, *, shutdown_executor: bool = False, idle_timeout: float = 0.05,
                 recovery_timeout: float = 300.0):
        self.sched_config, self.cache_config = sched_config, cache_config
        self.gateway, self.channel = gateway, channel
        self.shutdown_executor = shutdown_executor
        self.idle_timeout = idle_timeout
        self.recovery_timeout = recovery_timeout
        self.lost_at: Optional[float] = None     # monotonic time the executor was lost, until one is ready
        self.scheduler: Optional[Scheduler] = None
        self.ready: Optional[ExecutorReady] = None
        self.owners: dict[str, _Owned] = {}
        self.executor_known: set[int] = set()    # seq ids the executor holds state for
        self._resync = False                     # a plan failed: reconcile the next one
        self._stopping = False
        self._busy = False                       # the last turn ran a step: poll without blocking
        self.num_steps = 0
        self.num_executor_errors = 0
        self.num_executor_losses = 0

    # ---------------------------------------------------------------------------- loop

    def stop(self, *_args) -> None:
        self._stopping = True

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> None:
        """One turn: handshake (until ready), gateway messages, at most one step."""
        if self.ready is None:
            self._drain_gateway(self.idle_timeout)
            ready = self.channel.hello(self.cache_config.block_size, 0.0)
            if ready is not None:
                self._on_ready(ready)
            elif self.lost_at is not None and time.monotonic() - self.lost_at > self.recovery_timeout:
                self._give_up(f"no executor came back within {self.recovery_timeout:g}s")
            return
        if self.channel.lost():
            self._on_lost("the executor disconnected")
            return
        self._drain_gateway(0.0 if self._busy else self.idle_timeout)
        self._busy = self.ready is not None and self.step()

    def _on_ready(self, ready: ExecutorReady) -> None:
        sched, cache = _sized(self.sched_config, self.cache_config, ready)   # ConfigError: fatal
        if self.scheduler is None:
            self.scheduler = Scheduler(sched, cache, eos_token_ids=ready.eos_token_ids)
        else:                                    # a new executor after a lost one: recompute everything
            self.scheduler.eos_token_ids = frozenset(ready.eos_token_ids)
            resumed = len(self.scheduler.seqs)
            for error in self.scheduler.reset_for_new_executor(sched, cache):
                self._send_error(error)
            log.warning("executor back after %.1fs: %d sequences requeued for recompute, %d dropped",
                        time.monotonic() - self.lost_at, resumed, resumed - len(self.scheduler.seqs))
        self.ready, self.lost_at = ready, None
        self.executor_known.clear()
        self._resync = False
        log.info("executor ready: model %s on %s, %d blocks of %d tokens, %d host blocks, max_model_len %d",
                 ready.model, ready.device, cache.num_blocks, cache.block_size, cache.num_host_blocks,
                 sched.max_model_len)

    def step(self) -> bool:
        """Run one step if there is one; returns whether a plan was sent."""
        plan = self.scheduler.schedule()
        if plan is None:
            return False
        sent = self._reconciled(plan) if self._resync else plan
        try:
            result = self.channel.execute(sent)
        except ExecutorLost as e:
            self._on_lost(str(e))
            return True
        if isinstance(result, ExecutorError):
            self._fail_step(plan, f"executor error at step {plan.step_id}: {result.message}")
            return True
        try:
            outputs = self.scheduler.update(plan, result)
        except (ValueError, KeyError) as e:
            self._fail_step(plan, f"bad executor result at step {plan.step_id}: {e}")
            return True
        known = self.executor_known
        known.difference_update(sent.finished)
        known.difference_update(sent.preempted)
        known.update(s.seq_id for s in sent.new)
        known.update(f.child for f in sent.forks)
        self._resync = False
        self.num_steps += 1
        self._route(outputs)
        return True

    # ---------------------------------------------------------------------------- gateway

    def _drain_gateway(self, timeout_s: float, max_messages: int = 4096) -> None:
        timeout_ms = int(timeout_s * 1000)
        for _ in range(max_messages):
            if not self.gateway.poll(timeout_ms):
                return
            timeout_ms = 0
            identity, msg = transport.recv_routed(self.gateway)
            if isinstance(msg, ProtocolError):
                self._reply_invalid(identity, str(msg))
                continue
            self._handle(identity, msg)

    def _reply_invalid(self, identity: bytes, reason: str) -> None:
        log.warning("bad frame from gateway %s: %s", identity.hex(), reason)
        transport.send(self.gateway, RequestError(request_id="", code="invalid", message=reason), identity)

    def _handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, AddRequest):          # while recovering, requests queue for the new executor
            if self.scheduler is None:
                error = RequestError(request_id=msg.request_id, code="not_ready",
                                     message="the executor is not ready yet (loading the model)")
            else:
                error = self.scheduler.add_request(msg)
            if error is not None:
                transport.send(self.gateway, error, identity)
            else:
                self.owners[msg.request_id] = _Owned(identity, set(range(msg.sampling.n)))
        elif isinstance(msg, AbortRequest):
            owned = self.owners.get(msg.request_id)
            if owned is None or owned.identity != identity or self.scheduler is None:
                return                           # finished already, or not this gateway's
            if msg.sample_index is None:
                self.scheduler.abort_request(msg.request_id)
                del self.owners[msg.request_id]
                return
            try:
                out = self.scheduler.finish_sample(msg.request_id, msg.sample_index)
            except ValueError as e:
                self._reply_invalid(identity, str(e))
                return
            if out is not None:                  # its finish reaches the owner; the request
                self._route([out])               # is forgotten once its last sample finished
        elif isinstance(msg, StatsRequest):
            transport.send(self.gateway, self.stats(), identity)
        else:
            self._reply_invalid(identity, f"a gateway may not send {type(msg).__name__}")

    def stats(self) -> SchedulerStats:
        if self.scheduler is None:
            return SchedulerStats(executor_ready=False, block_size=self.cache_config.block_size)
        return msgspec.structs.replace(self.scheduler.stats(), executor_ready=self.ready is not None,
                                       max_model_len=self.scheduler.config.max_model_len,
                                       block_size=self.scheduler.block_size)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """One RequestOutputs per gateway identity; forget requests whose samples all finished."""
        batches: dict[bytes, list[RequestOutput]] = {}
        for out in outputs:
            owned = self.owners.get(out.request_id)
            if owned is None:
                continue
            batches.setdefault(owned.identity, []).append(out)
            if out.finish_reason is not None:
                owned.unfinished.discard(out.index)
                if not owned.unfinished:
                    del self.owners[out.request_id]
        for identity, batch in batches.items():
            transport.send(self.gateway, RequestOutputs(outputs=batch), identity)

    # ---------------------------------------------------------------------------- failures

    def _send_error(self, error: RequestError) -> None:
        """Tell the owner a request ended with an error (the Scheduler has dropped it already)."""
        owned = self.owners.pop(error.request_id, None)
        if owned is not None:
            transport.send(self.gateway, error, owned.identity)

    def _fail(self, request_ids, message: str) -> None:
        for rid in request_ids:
            if self.scheduler is not None:
                self.scheduler.abort_request(rid)
            self._send_error(RequestError(request_id=rid, code="executor_error", message=message))

    def _fail_step(self, plan: StepPlan, message: str) -> None:
        """The plan did not run: fail every request with state on the executor or in the plan."""
        self.num_executor_errors += 1
        log.error("%s", message)
        if self.scheduler is not None:
            self.scheduler.step_failed()
        ids = set(self.executor_known) | {s.seq_id for s in plan.new} | {f.child for f in plan.forks}
        if self.scheduler is None:
            affected = set(self.owners)
        else:
            affected = self.scheduler.request_ids_of(ids)
            affected |= {rid for rid in self.owners if not self.scheduler.has_request(rid)}
        self._fail(sorted(affected), message)
        self._resync = True

    def _on_lost(self, message: str) -> None:
        """The executor is gone with its KV cache: handshake again on a fresh socket; requests
        stay queued and are recomputed once a new executor is ready (``_on_ready``)."""
        self.num_executor_losses += 1
        log.error("%s; %d requests wait for a new executor (recompute)", message, len(self.owners))
        self.ready, self.lost_at = None, time.monotonic()
        self.executor_known.clear()
        self._resync = False
        self._busy = False
        if hasattr(self.channel, "reset"):
            self.channel.reset()

    def _give_up(self, message: str) -> None:
        """Recovery took too long: fail everything and start over as a fresh service."""
        log.error("%s; failing %d requests", message, len(self.owners))
        self._fail(list(self.owners), message)
        self.scheduler, self.lost_at = None, None

    def _reconciled(self, plan: StepPlan) -> StepPlan:
        """After a failed plan: drop exactly what the executor still holds."""
        known = self.executor_known
        drop = [sid for sid in plan.finished if sid in known]
        drop += sorted(known - set(drop) - set(plan.preempted))
        return msgspec.structs.replace(plan, finished=drop, preempted=[s for s in plan.preempted if s in known])

    # ---------------------------------------------------------------------------- shutdown

    def close(self) -> None:
        for rid, owned in list(self.owners.items()):
            if self.scheduler is not None:
                self.scheduler.abort_request(rid)
            outs = [RequestOutput(rid, i, [], "abort") for i in sorted(owned.unfinished)]
            transport.send(self.gateway, RequestOutputs(outputs=outs), owned.identity)
        self.owners.clear()
        if self.shutdown_executor:
            try:
                self.channel.shutdown()
            except zmq.ZMQError as e:
                log.warning("could not send Shutdown to the executor: %s", e)
        self.channel.close()


# ------------------------------------------------------------------------------ CLI


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _float_where(holds, rule: str):
    """An argparse type: a float for which ``holds(value)`` is true (NaN never is), else an error
    stating ``rule``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not holds(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value
    return parse


_fraction = _float_where(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
_positive_float = _float_where(lambda v: v > 0, "must be > 0")


def _address(text: str) -> str:
    try:
        return transport.check_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d_sched, d_cache = SchedulerConfig(), CacheConfig()
    p.add_argument("--gateway-addr", type=_address, default="tcp://127.0.0.1:5557",
                   help="ROUTER address the gateways connect to (bound here)")
    p.add_argument("--executor-addr", type=_address, default="tcp://127.0.0.1:5558",
                   help="the executor's ROUTER address (connected to)")
    p.add_argument("--block-size", type=int, default=d_cache.block_size, choices=[1, 2, 4, 8, 16, 32, 64, 128],
                   help="tokens per KV block; must match the executor's")
    p.add_argument("--num-blocks", type=_int_at_least(0), default=0, help="device KV blocks (0 = the executor's)")
    p.add_argument("--num-host-blocks", type=_int_at_least(0), default=0,
                   help="CPU swap blocks (0 = the executor's)")
    p.add_argument("--max-num-seqs", type=_int_at_least(1), default=d_sched.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=_int_at_least(1), default=d_sched.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=_int_at_least(0), default=0, help="0 = the executor's")
    p.add_argument("--max-waiting", type=_int_at_least(1), default=d_sched.max_waiting,
                   help="waiting-queue bound; beyond it requests get queue_full")
    p.add_argument("--watermark", type=_fraction, default=d_cache.watermark,
                   help="fraction of blocks kept free at admission")
    p.add_argument("--preemption-mode", choices=["recompute", "swap"], default=d_sched.preemption_mode)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d_cache.enable_prefix_caching)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=d_sched.enable_chunked_prefill)
    p.add_argument("--shutdown-executor", action="store_true",
                   help="send Shutdown to the executor on exit (when this process owns it)")
    p.add_argument("--hello-interval", type=_positive_float, default=1.0,
                   help="seconds between handshake attempts while the executor loads")
    p.add_argument("--step-timeout", type=_positive_float, default=300.0,
                   help="seconds to wait for one step's result before declaring the executor lost "
                        "(a dropped connection is noticed at once)")
    p.add_argument("--recovery-timeout", type=_positive_float, default=300.0,
                   help="seconds to wait for a new executor after losing one before failing all requests")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configs_from_args(args: argparse.Namespace) -> tuple[SchedulerConfig, CacheConfig]:
    """Cross-field checks (single flags are checked by argparse); ConfigError names the problem."""
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            max_model_len=args.max_model_len, max_waiting=args.max_waiting,
                            preemption_mode=args.preemption_mode,
                            enable_chunked_prefill=args.enable_chunked_prefill)
    cache = CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                        num_host_blocks=args.num_host_blocks, watermark=args.watermark,
                        enable_prefix_caching=args.enable_prefix_caching).validate()
    if sched.max_model_len:          # 0 is resolved at the handshake
        sched.validate()
    return sched, cache


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        sched, cache = configs_from_args(args)
    except ConfigError as e:
        print(f"pagedserve scheduler: error: {e}", file=sys.stderr)
        return 2
    ctx = zmq.Context()
    try:
        gateway = transport.router(ctx, args.gateway_addr)
        channel = ZmqExecutorChannel(ctx, args.executor_addr, args.hello_interval, args.step_timeout)
    except zmq.ZMQError as e:
        print(f"pagedserve scheduler: error: cannot bind/connect ({e})", file=sys.stderr)
        return 1
    service = SchedulerService(sched, cache, gateway, channel, shutdown_executor=args.shutdown_executor,
                               recovery_timeout=args.recovery_timeout)
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    log.info("scheduler serving gateways at %s, executor at %s", args.gateway_addr, args.executor_addr)
    try:
        service.serve_forever()
    except ConfigError as e:
        log.error("%s", e)
        return 1
    finally:
        gateway.close(linger=0)
        ctx.term()
    log.info("scheduler stopped")
    return 0
