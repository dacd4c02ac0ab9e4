"""The scheduler service over real ZeroMQ sockets, with the fake executor behind its own ROUTER."""
import logging
import os
import signal
import subprocess
import sys
import uuid

import msgspec
import pytest
import zmq

from services.scheduler.sim.fake_executor import FakeExecutor, FakeExecutorServer
from services.scheduler.cli import add_arguments
from services.scheduler.executor_channel import ExecutorLost, ExecutorTimeout, ZmqExecutorChannel
from services.scheduler.service import SchedulerService
from shared import transport
from shared.config import CacheConfig, SchedulerConfig
from shared.messages import (AbortRequest, ExecutorError, AddRequest, NewSeq, RequestError, RequestOutputs, SamplingParams,
                             SchedulerStats, StatsRequest, StepPlan, StepResult, encode)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalChannel:
    """An in-process executor (anything with ``ready()`` and ``execute(plan)``), no sockets."""

    def __init__(self, executor):
        self.executor = executor

    def hello(self, block_size: int, timeout_s: float):
        return self.executor.ready()

    def execute(self, plan: StepPlan, masks=None):
        return self.executor.execute(plan, (lambda: masks().masks) if masks else None)

    def forget(self, block_size: int, timeout_s: float) -> bool:
        self.executor.forget()
        return True

    def lost(self) -> bool:
        return False

    def reset(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


class Harness:
    """Fake executor server + service + gateway DEALERs, all on inproc:// in one context."""

    def __init__(self, *, num_blocks=64, max_waiting=64, max_num_seqs=16, loading_hellos=0, fail_steps=(),
                 channel=None, model=None, vocab_size=32000):
        self.ctx = zmq.Context()
        tag = uuid.uuid4().hex
        self.fake = FakeExecutor(block_size=4, num_blocks=num_blocks, max_model_len=256, strict=True,
                                 fail_steps=set(fail_steps), vocab_size=vocab_size)
        self.server = None
        if channel is None:
            self.server = FakeExecutorServer(self.fake, self.ctx, f"inproc://ex-{tag}", loading_hellos).start()
            channel = ZmqExecutorChannel(self.ctx, f"inproc://ex-{tag}", hello_interval=0.01, step_timeout=10)
        self.gw_addr = f"inproc://gw-{tag}"
        self.service = SchedulerService(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=0,
                            max_waiting=max_waiting),
            CacheConfig(block_size=4), transport.router(self.ctx, self.gw_addr), channel, idle_timeout=0.005,
            model=model)
        self.gateways = []

    def gateway(self) -> zmq.Socket:
        sock = transport.dealer(self.ctx, self.gw_addr)
        self.gateways.append(sock)
        return sock

    def pump(self, until=lambda: False, turns=2000):
        for _ in range(turns):
            self.service.run_once()
            if until():
                return
        raise AssertionError("condition not reached")

    def ready(self):
        self.pump(lambda: self.service.scheduler is not None)

    def ready_gateway(self) -> zmq.Socket:
        """A gateway DEALER, once the service has finished its handshake with the executor."""
        sock = self.gateway()
        self.ready()
        return sock

    def assert_drained(self, num_blocks: int = 64):
        """No request left, no stream owner left, every KV block free."""
        scheduler = self.service.scheduler
        assert not self.service.owners and not scheduler.has_unfinished()
        assert scheduler.num_free_blocks == num_blocks

    def close(self):
        self.service.close()
        self.service.gateway.close(linger=0)
        for s in self.gateways:
            s.close(linger=0)
        if self.server:
            self.server.stop()
        self.ctx.term()


@pytest.fixture
def make():
    made = []

    def factory(**kw):
        h = Harness(**kw)
        made.append(h)
        return h
    yield factory
    for h in made:
        h.close()


def inbox(sock) -> list:
    msgs = []
    while sock.poll(0):
        msgs.append(transport.recv(sock))
    return msgs


def collect(h, sock, request_ids, turns=2000):
    """Pump until every sample of the requests finished; returns (tokens per (rid, index), errors)."""
    tokens, finished, errors = {}, {}, []
    want = set(request_ids)

    def done():
        for m in inbox(sock):
            if isinstance(m, RequestError):
                errors.append(m)
                want.discard(m.request_id)
            elif isinstance(m, RequestOutputs):
                for o in m.outputs:
                    tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
                    if o.finish_reason:
                        finished[(o.request_id, o.index)] = o.finish_reason
        return all(any(k[0] == rid for k in finished) for rid in want)
    h.pump(done, turns)
    return tokens, finished, errors


def add(sock, rid, n_prompt=10, **sampling):
    transport.send(sock, AddRequest(request_id=rid, prompt_token_ids=list(range(3, 3 + n_prompt)),
                                    sampling=SamplingParams(**sampling)))


def finishes_alone(h, sock, rid, **sampling) -> list[int]:
    """A request added now runs to its max_tokens with no error; returns its tokens."""
    add(sock, rid, **sampling)
    tokens, finished, errors = collect(h, sock, [rid])
    assert finished == {(rid, 0): "length"} and not errors, (finished, errors)
    return tokens[(rid, 0)]


def test_add_streams_tokens_until_finished(make):
    h = make()
    gw = h.ready_gateway()
    add(gw, "a", max_tokens=5)
    add(gw, "b", n_prompt=9, max_tokens=3, n=2)
    tokens, finished, errors = collect(h, gw, ["a", "b"])
    assert not errors
    assert finished == {("a", 0): "length", ("b", 0): "length", ("b", 1): "length"}
    assert len(tokens[("a", 0)]) == 5 and len(tokens[("b", 0)]) == 3 and len(tokens[("b", 1)]) == 3
    assert tokens[("b", 0)] != tokens[("b", 1)]          # the fork samples its own tokens
    h.assert_drained()


def test_structured_requests_get_their_masks_in_a_frame_after_the_plan(make):
    """Over ZMQ the plan goes without its masks and a StepMasks frame follows (computed while
    the executor runs); the outputs follow the grammar, and a grammar that does not compile is
    refused at once with the request's id."""
    import json

    from shared.messages import GrammarSpec
    from shared.tokenizer import load_tokenizer

    tok = load_tokenizer("")
    h = make(model="", vocab_size=len(tok))
    gw = h.ready_gateway()
    for rid in ("a", "b"):
        transport.send(gw, AddRequest(request_id=rid, prompt_token_ids=list(range(3, 13)),
                                      sampling=SamplingParams(max_tokens=64, n=2),
                                      grammar=GrammarSpec("choice", json.dumps(["alpha", "beta", "gamma"]))))
    transport.send(gw, AddRequest(request_id="bad", prompt_token_ids=[3, 4],
                                  grammar=GrammarSpec("lark", "start: nowhere")))
    tokens, finished, errors = collect(h, gw, ["a", "b", "bad"])
    assert [(e.request_id, e.code) for e in errors] == [("bad", "invalid")]
    assert set(finished.values()) == {"stop"} and len(finished) == 4
    for ids in tokens.values():
        assert tok.decode(ids) in ("alpha", "beta", "gamma")
    masked = [p for p in h.server.plans if p.mask_seq_ids]
    assert masked and all(p.masks == b"" for p in masked)
    h.assert_drained()


def test_the_executors_sliding_window_reaches_the_scheduler_over_the_handshake(make):
    h = make()
    h.fake.sliding_window = 8                        # a Mistral-like model, W = 8 over blocks of 4
    gw = h.ready_gateway()
    assert h.service.scheduler.block_manager.sliding_window == 8
    add(gw, "long", max_tokens=60)
    most_held = []
    h.pump(lambda: most_held.append(64 - h.service.scheduler.num_free_blocks) or
           not h.service.scheduler.has_unfinished())
    assert h.fake.tokens_computed == 10 + 59 and h.service.scheduler.stats().generation_tokens == 60
    assert max(most_held) <= 3 < -(-70 // 4)          # ceil(8 / 4) + 1, not the whole sequence
    h.assert_drained()


def test_outputs_are_routed_to_the_gateway_that_owns_the_request(make):
    h = make()
    g1, g2 = h.gateway(), h.gateway()
    h.ready()
    add(g1, "one", max_tokens=4)
    add(g2, "two", max_tokens=4)
    h.pump(lambda: not h.service.owners or not h.service.scheduler.has_unfinished())
    got1 = {o.request_id for m in inbox(g1) if isinstance(m, RequestOutputs) for o in m.outputs}
    got2 = {o.request_id for m in inbox(g2) if isinstance(m, RequestOutputs) for o in m.outputs}
    assert got1 == {"one"} and got2 == {"two"}


def test_stats_before_and_after_the_handshake_and_not_ready_rejection(make):
    h = make(loading_hellos=3)                       # the executor ignores three hellos: "loading"
    gw = h.gateway()
    transport.send(gw, StatsRequest())
    add(gw, "early")
    h.service.run_once()
    h.pump(lambda: gw.poll(0), turns=50)
    replies = []
    h.pump(lambda: replies.extend(inbox(gw)) or len(replies) >= 2, turns=50)
    stats = next(m for m in replies if isinstance(m, SchedulerStats))
    error = next(m for m in replies if isinstance(m, RequestError))
    assert stats.executor_ready is False
    assert (error.request_id, error.code) == ("early", "not_ready")
    h.ready()                                        # the hello is retried until answered
    transport.send(gw, StatsRequest())
    got = []
    h.pump(lambda: got.extend(inbox(gw)) or got)
    assert got[0].executor_ready and got[0].num_blocks == 64 and got[0].max_model_len == 256
    assert got[0].block_size == 4 and got[0].num_free_blocks == 64


def test_abort_frees_everything_and_stops_the_stream(make):
    h = make()
    gw = h.ready_gateway()
    add(gw, "long", max_tokens=200)
    seen = []
    h.pump(lambda: seen.extend(inbox(gw)) or len(seen) >= 3)
    transport.send(gw, AbortRequest(request_id="long"))
    h.pump(lambda: not h.service.scheduler.has_unfinished())
    for _ in range(5):
        h.service.run_once()
    inbox(gw)
    for _ in range(5):
        h.service.run_once()
    assert inbox(gw) == []
    h.assert_drained()


def test_abort_from_another_gateway_is_ignored(make):
    h = make()
    owner, other = h.gateway(), h.gateway()
    h.ready()
    add(owner, "mine", max_tokens=6)
    h.service.run_once()
    transport.send(other, AbortRequest(request_id="mine"))
    _, finished, errors = collect(h, owner, ["mine"])
    assert finished == {("mine", 0): "length"} and not errors
    h.assert_drained()


def until_owners_are_gone(h, sock, seen=()):
    """Pump until the service forgot every request (each sample finished); returns tokens and
    finish reasons per (rid, index) and errors, counting the messages in ``seen`` too."""
    msgs = list(seen)
    h.pump(lambda: msgs.extend(inbox(sock)) or not h.service.owners)
    msgs.extend(inbox(sock))
    tokens, finished = {}, {}
    for m in msgs:
        for o in getattr(m, "outputs", ()):
            tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
            if o.finish_reason:
                assert (o.request_id, o.index) not in finished, "a sample finished twice"
                finished[(o.request_id, o.index)] = o.finish_reason
    return tokens, finished, [m for m in msgs if isinstance(m, RequestError)]


def test_abort_one_sample_streams_its_finish_and_the_others_go_on(make):
    h = make()
    gw = h.ready_gateway()
    add(gw, "three", max_tokens=30, n=3)
    seen = []
    h.pump(lambda: seen.extend(inbox(gw)) or len(seen) >= 3)       # forked and streaming
    transport.send(gw, AbortRequest(request_id="three", sample_index=1))
    tokens, finished, errors = until_owners_are_gone(h, gw, seen)
    assert not errors
    assert finished == {("three", 0): "length", ("three", 1): "abort", ("three", 2): "length"}
    assert len(tokens[("three", 0)]) == len(tokens[("three", 2)]) == 30
    assert 3 <= len(tokens[("three", 1)]) < 30
    h.assert_drained()


def test_aborting_every_sample_one_by_one_ends_the_request(make):
    h = make()
    gw = h.ready_gateway()
    add(gw, "pair", max_tokens=50, n=2)
    transport.send(gw, AbortRequest(request_id="pair", sample_index=0))   # same turn: before the fork
    h.pump(lambda: gw.poll(0))
    transport.send(gw, AbortRequest(request_id="pair", sample_index=1))
    tokens, finished, errors = until_owners_are_gone(h, gw)
    assert not errors and finished == {("pair", 0): "abort", ("pair", 1): "abort"}
    assert ("pair", 0) not in tokens or tokens[("pair", 0)] == []
    h.assert_drained()


def test_abort_of_a_sample_out_of_range_is_invalid_and_the_request_goes_on(make):
    h = make()
    gw, other = h.gateway(), h.gateway()
    h.ready()
    add(gw, "pair", max_tokens=4, n=2)
    h.service.run_once()
    transport.send(other, AbortRequest(request_id="pair", sample_index=0))   # not its request
    transport.send(gw, AbortRequest(request_id="pair", sample_index=2))
    tokens, finished, errors = until_owners_are_gone(h, gw)
    assert [(e.request_id, e.code) for e in errors] == [("", "invalid")] and "out of range" in errors[0].message
    assert finished == {("pair", 0): "length", ("pair", 1): "length"}
    h.assert_drained()


def test_queue_full_is_answered_to_the_sender(make):
    h = make(max_waiting=1)
    gw = h.ready_gateway()
    add(gw, "first", max_tokens=2)
    add(gw, "second", max_tokens=2)                  # drained in the same turn: the queue holds one
    tokens, finished, errors = collect(h, gw, ["first", "second"])
    assert [(e.request_id, e.code) for e in errors] == [("second", "queue_full")]
    assert finished == {("first", 0): "length"}
    h.assert_drained()


def test_too_long_prompt_is_answered(make):
    h = make()
    gw = h.ready_gateway()
    add(gw, "huge", n_prompt=300)
    _, _, errors = collect(h, gw, ["huge"])
    assert errors[0].code == "too_long"
    h.assert_drained()


@pytest.mark.parametrize("frames", [
    [b"\xc1garbage"],
    [msgspec.msgpack.encode({"type": "add", "version": 1, "request_id": "x", "prompt_token_ids": [-5]})],
    [msgspec.msgpack.encode({"type": "add", "version": 99, "request_id": "x", "prompt_token_ids": [1]})],
    [encode(StepPlan(step_id=0))],                   # a valid message the gateway may not send
    [encode(StatsRequest()), b"extra frame"],
])
def test_malformed_frames_get_an_error_and_the_service_keeps_serving(make, frames):
    h = make()
    gw = h.ready_gateway()
    gw.send_multipart(frames)
    replies = []
    h.pump(lambda: replies.extend(inbox(gw)) or replies)
    assert isinstance(replies[0], RequestError)
    assert replies[0].request_id == "" and replies[0].code == "invalid" and replies[0].message
    finishes_alone(h, gw, "after", max_tokens=3)
    h.assert_drained()


@pytest.mark.parametrize("fail_step", [0, 2])       # 0: the failed plan registered the sequence
def test_executor_error_fails_the_step_requests_and_the_service_recovers(make, fail_step):
    h = make(max_num_seqs=1, fail_steps={fail_step})  # the second request waits behind the first
    gw = h.ready_gateway()
    add(gw, "victim", max_tokens=10)
    add(gw, "queued", max_tokens=3)
    tokens, finished, errors = collect(h, gw, ["victim", "queued"])
    assert [(e.request_id, e.code) for e in errors] == [("victim", "executor_error")]
    assert "injected failure" in errors[0].message
    assert finished == {("queued", 0): "length"}     # waiting requests survive; the executor resynced
    assert h.service.num_executor_errors == 1
    finishes_alone(h, gw, "later", max_tokens=4)     # strict fake: any state mismatch would error again
    h.assert_drained()
    assert set(h.fake.seqs) <= h.service.executor_known


@pytest.mark.parametrize("fail_step", [0, 1, 3])
def test_a_step_that_failed_after_running_in_part_leaves_no_stale_state(make, fail_step):
    """The executor applied the step (drops, new sequences, forks, tokens) and then failed, as
    one whose deferred masks never came would: after the hello that follows, it holds nothing,
    so the next plans agree with it and later requests finish."""
    class FailsAfterRunning(FakeExecutor):
        def execute(self, plan, masks=None):
            result = super().execute(plan, masks)
            if plan.step_id == fail_step:
                return ExecutorError(step_id=plan.step_id, message="failed after the forward")
            return result

    fake = FailsAfterRunning(block_size=4, num_blocks=64, max_model_len=256, strict=True)
    h = make(channel=LocalChannel(fake))
    gw = h.ready_gateway()
    add(gw, "a", max_tokens=6, n=2)
    add(gw, "b", max_tokens=6)
    tokens, finished, errors = collect(h, gw, ["a", "b"])
    assert {e.code for e in errors} == {"executor_error"} and not fake.seqs
    for i in range(3):
        finishes_alone(h, gw, f"later{i}", max_tokens=4)
    h.assert_drained()


class Restartable(LocalChannel):
    """An in-process executor that dies when step ``die_at`` is sent (the step never runs) and is
    replaced by ``replacement`` after ``down_hellos`` unanswered hellos."""

    def __init__(self, executor, replacement, die_at: int, down_hellos: int = 3):
        super().__init__(executor)
        self.replacement, self.die_at, self.down_hellos = replacement, die_at, down_hellos
        self.dead = False

    def hello(self, block_size, timeout_s):
        if self.dead:
            if self.down_hellos > 0:
                self.down_hellos -= 1
                return None
            self.executor, self.dead = self.replacement, False
        return self.executor.ready()

    def execute(self, plan, masks=None):
        if plan.step_id == self.die_at and self.replacement is not None:
            self.dead, self.die_at = True, -1
            raise ExecutorLost(f"the executor disconnected during step {plan.step_id}")
        return super().execute(plan, masks)


@pytest.mark.parametrize("die_at", [0, 1, 4, 9])      # 0: the lost step admitted the requests
def test_lost_executor_requeues_everything_and_requests_finish_by_recompute(make, die_at):
    old = FakeExecutor(block_size=4, num_blocks=64, max_model_len=256, strict=True)
    new = FakeExecutor(block_size=4, num_blocks=40, max_model_len=256, strict=True)   # a smaller pool
    h = make(channel=Restartable(old, new, die_at))
    gw = h.ready_gateway()
    add(gw, "a", max_tokens=12)
    add(gw, "b", n_prompt=7, max_tokens=8, n=2)
    tokens, finished, errors = collect(h, gw, ["a", "b"])
    assert not errors
    assert finished == {("a", 0): "length", ("b", 0): "length", ("b", 1): "length"}
    # each token streamed once: recompute resumes after the last emitted token
    assert [len(tokens[k]) for k in [("a", 0), ("b", 0), ("b", 1)]] == [12, 8, 8]
    assert h.service.num_executor_losses == 1 and h.service.scheduler.block_manager.num_blocks == 40
    h.assert_drained(40)
    finishes_alone(h, gw, "after", max_tokens=3)     # the strict new executor agrees with the scheduler


def test_requests_that_no_longer_fit_the_new_executor_get_a_clear_error(make):
    old = FakeExecutor(block_size=4, num_blocks=64, max_model_len=256)
    new = FakeExecutor(block_size=4, num_blocks=4, max_model_len=256)               # 16 tokens at most
    h = make(channel=Restartable(old, new, die_at=3))
    gw = h.ready_gateway()
    add(gw, "long", n_prompt=20, max_tokens=5)
    add(gw, "short", n_prompt=3, max_tokens=5)
    tokens, finished, errors = collect(h, gw, ["long", "short"])
    assert [(e.request_id, e.code) for e in errors] == [("long", "executor_error")]
    assert "at most 16 tokens" in errors[0].message
    assert finished == {("short", 0): "length"} and len(tokens[("short", 0)]) == 5
    h.assert_drained(4)


def test_requests_added_while_the_executor_is_down_wait_for_the_new_one(make):
    old = FakeExecutor(block_size=4, num_blocks=64, max_model_len=256)
    h = make(channel=Restartable(old, FakeExecutor(block_size=4, num_blocks=64, max_model_len=256),
                                 die_at=1, down_hellos=50))
    gw = h.ready_gateway()
    add(gw, "first", max_tokens=4)
    h.pump(lambda: h.service.ready is None)
    transport.send(gw, StatsRequest())
    add(gw, "during", max_tokens=4)
    tokens, finished, errors = collect(h, gw, ["first", "during"])
    assert not errors and finished == {("first", 0): "length", ("during", 0): "length"}
    h.assert_drained()


def test_no_executor_back_within_the_recovery_timeout_fails_everything(make):
    old = FakeExecutor(block_size=4, num_blocks=64, max_model_len=256)
    h = make(channel=Restartable(old, old, die_at=1, down_hellos=10**9))
    h.service.recovery_timeout = 0.05
    gw = h.ready_gateway()
    add(gw, "stuck", max_tokens=4)
    _, _, errors = collect(h, gw, ["stuck"])
    assert (errors[0].request_id, errors[0].code) == ("stuck", "executor_error")
    assert "no executor came back" in errors[0].message
    assert h.service.scheduler is None and not h.service.owners


def test_step_timeout_counts_as_a_lost_executor(make):
    fake = FakeExecutor(block_size=4, num_blocks=64, max_model_len=256)

    class Wedged(LocalChannel):
        fail = True

        def execute(self, plan, masks=None):
            if self.fail:
                self.fail = False
                raise ExecutorTimeout("no reply to step 0 within 1s")
            return super().execute(plan, masks)

    h = make(channel=Wedged(fake))
    gw = h.ready_gateway()
    finishes_alone(h, gw, "slow", max_tokens=3)
    assert h.service.num_executor_losses == 1
    h.assert_drained()


def test_killed_executor_process_is_noticed_by_the_socket_monitor(tmp_path, caplog):
    """A real ROUTER over ipc:// goes away mid-generation (its socket closes, as on kill -9); the
    service notices the disconnect, not the (huge) step timeout, and a new executor at the same
    address finishes the request."""
    ctx = zmq.Context()
    addr = f"ipc://{tmp_path}/ex.sock"
    fake = FakeExecutor(block_size=4, num_blocks=64, max_model_len=256, strict=True)
    server = FakeExecutorServer(fake, ctx, addr).start()
    channel = ZmqExecutorChannel(ctx, addr, hello_interval=0.01, step_timeout=3600)
    service = SchedulerService(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=0),
                               CacheConfig(block_size=4), transport.router(ctx, f"ipc://{tmp_path}/gw.sock"),
                               channel, idle_timeout=0.005)
    gw = transport.dealer(ctx, f"ipc://{tmp_path}/gw.sock")
    replacement = None
    try:
        while service.ready is None:
            service.run_once()
        add(gw, "r", max_tokens=40)
        tokens = []
        while len(tokens) < 5:
            service.run_once()
            tokens += [t for m in inbox(gw) for o in m.outputs for t in o.token_ids]
        server.stop()                                 # the executor's socket is gone
        while service.ready is not None:
            service.run_once()
        assert service.num_executor_losses == 1
        assert "the executor disconnected" in caplog.text
        replacement = FakeExecutorServer(FakeExecutor(block_size=4, num_blocks=32, max_model_len=256, strict=True),
                                         ctx, addr).start()
        finished = False
        while not finished:
            service.run_once()
            for m in inbox(gw):
                assert isinstance(m, RequestOutputs), m
                tokens += [t for o in m.outputs for t in o.token_ids]
                finished = any(o.finish_reason for o in m.outputs)
        assert len(tokens) == 40 and service.scheduler.num_free_blocks == 32
    finally:
        service.close()
        service.gateway.close(linger=0)
        gw.close(linger=0)
        if replacement is not None:
            replacement.stop()
        ctx.term()


def test_late_answers_to_hellos_queued_while_loading_are_skipped_quietly(tmp_path, caplog):
    """Hellos sent before the executor binds queue in the socket and it answers every one: the extra
    ExecutorReady replies that arrive during the first step are expected (DEBUG, not a WARNING)."""
    caplog.set_level(logging.DEBUG, logger="pagedserve.scheduler")
    ctx = zmq.Context()
    addr = f"ipc://{tmp_path}/ex.sock"
    channel = ZmqExecutorChannel(ctx, addr, hello_interval=0, step_timeout=10)
    server = None
    try:
        for _ in range(3):
            assert channel.hello(4, 0.01) is None      # nobody bound yet: the hellos queue
        server = FakeExecutorServer(FakeExecutor(block_size=4, num_blocks=8), ctx, addr).start()
        for _ in range(100):
            if channel.hello(4, 0.1) is not None:
                break
        else:
            raise AssertionError("no ExecutorReady")
        plan = StepPlan(step_id=0, new=[NewSeq(0, [5, 6, 7], [], [0], 0, 3, SamplingParams())])
        assert isinstance(channel.execute(plan), StepResult)
    finally:
        channel.close()
        if server is not None:
            server.stop()
        ctx.term()
    late = [r for r in caplog.records if "late ExecutorReady" in r.getMessage()]
    assert late and all(r.levelno == logging.DEBUG for r in late)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_block_size_mismatch_is_fatal_with_a_clear_message(make):
    fake = FakeExecutor(block_size=16, num_blocks=8)
    h = make(channel=LocalChannel(fake))
    with pytest.raises(ValueError, match="--block-size 4 but the executor uses 16"):
        h.service.run_once()


def test_executor_refusing_the_handshake_is_fatal(make):
    h = make()
    h.fake.block_size = 8                            # the server answers hellos with ExecutorError
    with pytest.raises(ValueError, match="refused the handshake: block size mismatch"):
        h.pump(turns=200)


@pytest.mark.parametrize("argv, flag", [
    (["--num-blocks", "-1"], "--num-blocks"),
    (["--block-size", "3"], "--block-size"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--watermark", "1.5"], "--watermark"),
    (["--preemption-mode", "drop"], "--preemption-mode"),
    (["--gateway-addr", "localhost:5"], "--gateway-addr"),
    (["--max-num-batched-tokens", "x"], "--max-num-batched-tokens"),
])
def test_bad_flags_are_argparse_errors_naming_the_flag(argv, flag, capsys):
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_process_serves_and_shuts_the_executor_down_on_sigterm(tmp_path):
    ctx = zmq.Context()
    ex_addr, gw_addr = f"ipc://{tmp_path}/ex.sock", f"ipc://{tmp_path}/gw.sock"
    server = FakeExecutorServer(FakeExecutor(block_size=16, num_blocks=32, max_model_len=128), ctx, ex_addr).start()
    proc = subprocess.Popen([sys.executable, "-m", "services.scheduler", "--gateway-addr", gw_addr,
                             "--executor-addr", ex_addr, "--hello-interval", "0.05", "--shutdown-executor"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    gw = transport.dealer(ctx, gw_addr)
    try:
        outputs = []
        for _ in range(400):                          # poll stats until ready, then generate
            transport.send(gw, StatsRequest())
            assert gw.poll(10_000)
            if transport.recv(gw).executor_ready:
                break
        add(gw, "p", max_tokens=4)
        while not any(o.finish_reason for o in outputs):
            assert gw.poll(10_000)
            outputs += transport.recv(gw).outputs
        assert sum(len(o.token_ids) for o in outputs) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        server.thread.join(timeout=5)
        assert server.stopped.is_set()                # Shutdown reached the executor
    finally:
        if proc.poll() is None:
            proc.kill()
        gw.close(linger=0)
        server.stop()
        ctx.term()
