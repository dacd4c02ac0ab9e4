"""The scheduler service: the Scheduler behind ZeroMQ. Pure CPU, never imports torch.

Sockets (shared/transport.py): a ROUTER bound at ``--gateway-addr`` that any number of gateways
connect to, and an ExecutorChannel (executor_channel.py) to the executor. The command line is
in scheduler/cli.py.

Life of the loop (``SchedulerService.run_once``):
  * until the executor is ready, send ``ExecutorHello`` every ``--hello-interval`` seconds and
    answer gateways meanwhile (AddRequest -> RequestError "not_ready", stats with
    ``executor_ready=False``); the first ``ExecutorReady`` sizes the cache and builds the Scheduler;
  * drain the gateway socket (without blocking when there is work, else block up to
    ``idle_timeout``): AddRequest, AbortRequest (the whole request, or with ``sample_index`` one
    sample, whose finish "abort" is streamed back), StatsRequest; a bad frame gets RequestError
    ``invalid`` with ``request_id=""`` and the loop goes on;
  * one step (``step_loop.run_step``): ``schedule()`` -> StepPlan to the executor -> StepResult
    -> ``update()`` -> one RequestOutputs per gateway identity.

An executor error (ExecutorError, or a reply ``update`` rejects) fails, with RequestError
``executor_error``, every request that has state on the executor or in the failed plan; waiting
requests stay queued. The failed plan may have run in part on the executor (a failure after its
forward pass), so a hello makes the executor forget every sequence (``channel.forget``; no answer
within ``FORGET_TIMEOUT_S``: the executor is lost), and the next plan is reconciled: its drop
lists name no sequence, since the executor holds none.

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

import logging
import time
from dataclasses import dataclass
from typing import Optional

import msgspec
import zmq

from services.scheduler.executor_channel import ExecutorChannel, ExecutorLost
from services.scheduler.grammar import GrammarBackend, TokenizerLoader
from services.scheduler.scheduler import Scheduler
from services.scheduler.step_loop import StepFailed, run_step
from shared import transport
from shared.config import CacheConfig, SchedulerConfig, resolve_with_executor
from shared.messages import (
    AbortRequest, AddRequest, ExecutorReady, ProtocolError, RequestError, RequestOutput, RequestOutputs,
    SchedulerStats, StatsRequest, StepPlan,
)

log = logging.getLogger("pagedserve.scheduler")

FORGET_TIMEOUT_S = 30.0      # after a failed step: the executor's answer to the hello that resets it


@dataclass
class _Owned:
    identity: bytes
    unfinished: set[int]         # sample indices without a finish_reason yet


class SchedulerService:
    """The scheduler's event loop. The limits in ``sched_config`` and ``cache_config`` may be 0:
    the executor's values are taken at the handshake (``resolve_with_executor``)."""

    def __init__(self, sched_config: SchedulerConfig, cache_config: CacheConfig, gateway: zmq.Socket,
                 channel: ExecutorChannel, *, shutdown_executor: bool = False, idle_timeout: float = 0.05,
                 recovery_timeout: float = 300.0, model: Optional[str] = None):
        self.sched_config, self.cache_config = sched_config, cache_config
        self.gateway, self.channel = gateway, channel
        self.shutdown_executor = shutdown_executor
        self.idle_timeout = idle_timeout
        self.recovery_timeout = recovery_timeout
        # structured outputs need the model's tokenizer: loaded in the background from now on
        self.tokenizer = TokenizerLoader(model) if model is not None else None
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
        sched, cache = resolve_with_executor(self.sched_config, self.cache_config, ready)  # ConfigError: fatal
        if self.scheduler is None:
            grammars = None if self.tokenizer is None else GrammarBackend(
                self.tokenizer.bind(ready.vocab_size, ready.eos_token_ids), ready.vocab_size,
                sched.grammar_cache_size)
            self.scheduler = Scheduler(sched, cache, eos_token_ids=ready.eos_token_ids, grammars=grammars)
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
        sent: list[StepPlan] = []                # the plan as sent: reconciled after a failed one

        def execute(plan: StepPlan):
            sent.append(self._reconciled(plan) if self._resync else plan)
            masks = (lambda: self.scheduler.step_masks(plan)) if plan.mask_seq_ids else None
            return self.channel.execute(sent[0], masks)

        try:
            outputs = run_step(self.scheduler, execute, defer_masks=True)
        except ExecutorLost as e:
            self._on_lost(str(e))
            return True
        if outputs is None:
            return False
        if isinstance(outputs, StepFailed):
            self._fail_step(outputs.plan, outputs.message)
            return True
        known = self.executor_known
        known.difference_update(sent[0].finished)
        known.difference_update(sent[0].preempted)
        known.update(s.seq_id for s in sent[0].new)
        known.update(f.child for f in sent[0].forks)
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
        if self.channel.forget(self.cache_config.block_size, FORGET_TIMEOUT_S):
            self.executor_known.clear()
        else:
            self._on_lost("the executor did not answer the hello after a failed step")

    def _on_lost(self, message: str) -> None:
        """The executor is gone with its KV cache: handshake again on a fresh socket; requests
        stay queued and are recomputed once a new executor is ready (``_on_ready``)."""
        self.num_executor_losses += 1
        log.error("%s; %d requests wait for a new executor (recompute)", message, len(self.owners))
        self.ready, self.lost_at = None, time.monotonic()
        self.executor_known.clear()
        self._resync = False
        self._busy = False
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
