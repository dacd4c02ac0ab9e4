"""Fuzzing the wire: the codec on random bytes and random valid-looking frames, and the services'
sockets on garbage (each bad frame is answered and logged, and a valid request is served after).
"""
from __future__ import annotations

import contextlib
import logging
import threading

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import transport
from shared.messages import (
    PROTOCOL_VERSION, AbortRequest, AddRequest, AnyMessage, ExecutorError, ExecutorHello, ExecutorReady, Message,
    ProtocolError, RequestError, RequestOutputs, SamplingParams, Shutdown, StepPlan, StepResult, decode,
    encode,
)
from tests.test_scheduler_service import Harness
from tests.test_worker_errors import BS, ok_decode, tiny_config, worker  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

TAGS = sorted(cls.__struct_config__.tag for cls in AnyMessage.__args__)
FIELDS = sorted({f for cls in AnyMessage.__args__ for f in cls.__struct_fields__} - {"type", "version"})

# any msgpack value: what a confused or hostile peer could put in a field
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=20)


@st.composite
def lookalike_frames(draw) -> bytes:
    """A msgpack map with a real tag, mostly the right version, real field names, random values."""
    frame = {"type": draw(st.sampled_from(TAGS) | st.text(max_size=8)),
             "version": draw(st.just(PROTOCOL_VERSION) | values)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8)):
        frame[name] = draw(values)
    if draw(st.booleans()):
        del frame["type"]
    return msgspec.msgpack.encode(frame)


def _decode_only_protocol_errors(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert isinstance(msg, Message) and msg.version == PROTOCOL_VERSION
    assert decode(encode(msg)) == msg          # whatever is accepted is a well-formed message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_decode_random_bytes(frame):
    _decode_only_protocol_errors(frame)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lookalike_frames())
def test_decode_valid_looking_frames(frame):
    _decode_only_protocol_errors(frame)


_VALID = [encode(m) for m in (
    AddRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(n=2, seed=3, logprobs=1)),
    StepPlan(step_id=4, run_seq_ids=[1], run_num_tokens=[1]), StepResult(step_id=1, seq_ids=[1], token_ids=[5]),
    ExecutorReady(model="m", block_size=16, num_blocks=8, num_host_blocks=0, max_model_len=64,
                  vocab_size=100, eos_token_ids=[2]),
)]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_VALID), st.data())
def test_decode_mutated_valid_frames(frame, data):
    """Flip, cut and splice bytes of real frames."""
    b = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del b[i:i + data.draw(st.integers(1, 8))]
        else:
            b[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    _decode_only_protocol_errors(bytes(b))


# --------------------------------------------------------------------------------------------
# service level


def _garbage_frames(count: int) -> list[bytes]:
    """Deterministic garbage: random bytes, look-alike maps, and messages a gateway may not send."""
    frames = []

    @settings(max_examples=count, database=None, derandomize=True)
    @given(st.one_of(st.binary(max_size=64), lookalike_frames()))
    def collect(frame):
        frames.append(frame)

    collect()
    frames += [encode(StepPlan(step_id=1)), encode(Shutdown()), encode(ExecutorHello(block_size=4)), b""]
    return frames


def _drain_until(h: Harness, sock: zmq.Socket, done, turns: int = 5000) -> list:
    got = []

    def until():
        while sock.poll(0):
            got.append(transport.recv(sock))
        return done(got)

    h.pump(until, turns)
    return got


def test_scheduler_rejects_garbage_from_a_gateway_and_keeps_serving(caplog):
    caplog.set_level(logging.WARNING, logger="pagedserve.scheduler")
    h = Harness(num_blocks=32)
    try:
        h.ready()
        gw = h.gateway()
        frames = _garbage_frames(150)
        rejected = 0
        for frame in frames:
            gw.send(frame)
            replies = _drain_until(h, gw, lambda got: bool(got), turns=200)
            assert len(replies) == 1
            if isinstance(replies[0], RequestError):
                assert replies[0].code == "invalid" and replies[0].request_id == ""
                rejected += 1
            # a random frame may happen to be a valid stats request / abort / add: all fine
        gw.send_multipart([b"two", b"frames"])
        assert isinstance(_drain_until(h, gw, bool, turns=200)[0], RequestError)
        assert rejected >= len(frames) * 0.9
        bad = [r for r in caplog.records if "bad frame from gateway" in r.getMessage()]
        assert len(bad) >= rejected
        # still serving: a valid request streams to the end, then every block is free
        for rid in list(h.service.owners):    # look-alike requests that happened to be valid
            transport.send(gw, AbortRequest(request_id=rid))
        h.pump(lambda: not h.service.owners, turns=100)
        transport.send(gw, AddRequest(request_id="valid", prompt_token_ids=[1, 2, 3],
                                      sampling=SamplingParams(max_tokens=5, ignore_eos=True)))
        out = _drain_until(h, gw, lambda got: any(
            isinstance(m, RequestOutputs) and any(o.finish_reason for o in m.outputs) for m in got))
        tokens = [t for m in out if isinstance(m, RequestOutputs) for o in m.outputs for t in o.token_ids]
        assert len(tokens) == 5
        h.pump(lambda: not h.service.scheduler.has_unfinished(), turns=100)
        stats = h.service.stats()
        assert stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0
    finally:
        h.close()


@contextlib.contextmanager
def _serving_executor(worker_):
    """The executor's ZMQ loop on ``worker_`` in a thread and a DEALER to it; yields (client, the
    loop's exit codes or exception). On exit: Shutdown if the loop still runs, then close it all."""
    from services.executor.service import serve

    ctx = zmq.Context()
    addr = f"inproc://fuzz-executor-{id(worker_)}"
    sock = transport.router(ctx, addr)
    code: list = []

    def run():
        try:
            code.append(serve(worker_, sock))
        except BaseException as e:  # noqa: BLE001 - recorded for the test to report
            code.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client = transport.dealer(ctx, addr)
    try:
        yield client, code
    finally:
        if thread.is_alive():
            transport.send(client, Shutdown())
            thread.join(timeout=10)
        client.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def test_executor_rejects_garbage_frames_and_keeps_serving(worker, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="pagedserve.executor")
    with _serving_executor(worker) as (client, code):
        client.setsockopt(zmq.RCVTIMEO, 10_000)
        frames = [f for f in _garbage_frames(150)
                  if not isinstance(_try_decode(f), (StepPlan, Shutdown, ExecutorHello))]
        for frame in frames:
            client.send(frame)
            reply = transport.recv(client)
            assert isinstance(reply, ExecutorError) and reply.step_id == -1, reply
        undecodable = sum(_try_decode(f) is None for f in frames)
        assert undecodable >= len(frames) * 0.9
        assert len([r for r in caplog.records if "bad frame" in r.getMessage()]) == undecodable
        transport.send(client, ok_decode(1))
        res = transport.recv(client)
        assert isinstance(res, StepResult) and res.seq_ids == [1]
        assert not code, f"the executor loop ended: {code}"
    assert code == [0]                               # the Shutdown on exit ended the loop cleanly


def test_executor_survives_a_multipart_message(worker):  # noqa: F811
    with _serving_executor(worker) as (client, code):
        client.setsockopt(zmq.RCVTIMEO, 1_000)
        client.send_multipart([b"two", b"frames"])
        rejected = transport.recv(client)
        assert isinstance(rejected, ExecutorError) and "one message frame" in rejected.message
        transport.send(client, ok_decode(1))
        res = transport.recv(client)
        assert not code, f"the executor loop ended: {code}"
        assert isinstance(res, StepResult)


def _try_decode(frame: bytes):
    try:
        return decode(frame)
    except ProtocolError:
        return None
