"""A scripted scheduler for gateway tests: a real zmq ROUTER in a thread, no engine behind it.

Every AddRequest is answered by streaming the tokens of ``reply`` (tokenized with the real
tokenizer) one token per RequestOutput, for each of the ``n`` samples (sample ``i`` streams
``sample_replies[i]`` instead when that list is set), cut at ``max_tokens`` (finish "length") or
ending with EOS (finish "stop"); a beam search request gets its n hypotheses (the same
replies) in one message at once, each whole, with ``cumulative_logprob`` -1 - index; ``hold_after`` {sample index: k} makes that sample wait after k
tokens until it is aborted or the hold is lifted (a window that lasts until the test ends it,
instead of a delay it must win against). ``error`` makes it refuse requests with that
RequestError code instead; ``fail_after`` makes it fail them with "executor_error" once that many
tokens per sample were sent (as when the executor fails a step); ``max_active`` bounds the
requests it holds (beyond: "queue_full", as the real scheduler's waiting queue does). Requests,
whole-request aborts (``aborted``) and per-sample aborts (``aborted_samples``: the sample stops and
gets its "abort" finish, as the real scheduler does) are recorded; StatsRequest gets
SchedulerStats (``num_blocks`` blocks of 16 tokens). ``addr`` binds a given address (a scheduler
restarted where the gateway expects it); ``wait_for`` waits for a condition on the records.

``ServerThread`` serves an app with a real uvicorn (the gateway's own HTTP settings) on a free
loopback port in a thread; ``gateway_tokenizer`` loads the default tokenizer once per process.
"""
from __future__ import annotations

import functools
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field

import uvicorn
import zmq

from services.gateway.cli import uvicorn_options
from shared.tokenizer import load_tokenizer
from shared import transport
from tests.waits import wait_until
from shared.messages import (
    AbortRequest, AddRequest, RequestError, RequestOutput, RequestOutputs, SchedulerStats,
    StatsRequest, TokenLogprobs,
)


@functools.lru_cache(maxsize=1)
def gateway_tokenizer():
    return load_tokenizer("")


class ServerThread:
    def __init__(self, app, **options):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = {**uvicorn_options(port=self.port, log_level="warning"), **options}
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class _Active:
    identity: bytes
    req: AddRequest
    tokens: list[list[int]]          # per sample: the tokens still to send
    finish: list[str]                # per sample: finish reason of its last token
    sent: int = 0                    # steps taken
    pos: list[int] = field(default_factory=list)    # per sample: tokens sent

    def __post_init__(self):
        self.pos = [0] * len(self.tokens)

    def done(self) -> bool:
        return all(p >= len(t) for p, t in zip(self.pos, self.tokens))


@dataclass
class FakeScheduler:
    tokenizer: object
    reply: str = "Hello world!"
    sample_replies: list[str] | None = None
    token_delay: float = 0.0
    error: str | None = None            # queue_full / not_ready / too_long / invalid
    fail_after: int | None = None       # tokens per sample sent before an executor_error
    executor_ready: bool = True
    max_model_len: int = 256
    max_active: int | None = None
    num_blocks: int = 100
    eos_token_id: int = 2
    requests: list[AddRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    aborted_samples: list[tuple[str, int]] = field(default_factory=list)
    generated: int = 0
    addr: str = ""                      # bind here (a restarted scheduler); "" = a fresh ipc path
    hold_after: dict[int, int] | None = None    # sample index -> tokens after which it waits (abort or release)

    def __post_init__(self):
        self._dir = tempfile.mkdtemp(prefix="fake-sched-")
        self.addr = self.addr or transport.ipc_address(self._dir, "gateway")
        self._ctx = zmq.Context()
        self._sock = transport.router(self._ctx, self.addr)
        self._active: dict[str, _Active] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fake-scheduler")
        self._thread.start()

    def reset(self) -> None:
        self.reply, self.token_delay, self.error, self.fail_after = "Hello world!", 0.0, None, None
        self.sample_replies = None
        self.executor_ready, self.max_model_len = True, 256
        self.max_active, self.num_blocks = None, 100
        self.hold_after = None
        self.requests.clear()
        self.aborted.clear()
        self.aborted_samples.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()
        try:
            os.rmdir(self._dir)
        except OSError:
            pass

    def wait_for_abort(self, request_id_prefix: str = "", timeout: float = 5.0) -> list[str]:
        return self.wait_for(lambda: [r for r in self.aborted if r.startswith(request_id_prefix)], timeout) or []

    def wait_for(self, condition, timeout: float = 20.0):
        """Poll ``condition()`` until it is truthy (returns its value) or ``timeout`` passes (None)."""
        return wait_until(condition, timeout)

    # -- the thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_step = time.monotonic()
        while not self._stop.is_set():
            timeout_ms = 10 if not self._active else max(0, int((next_step - time.monotonic()) * 1000))
            if poller.poll(timeout_ms):
                while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    identity, msg = transport.recv_routed(self._sock)
                    self._handle(identity, msg)
            if self._active and time.monotonic() >= next_step:
                sent = self._step()
                next_step = time.monotonic() + (self.token_delay if sent else max(self.token_delay, 0.005))

    def _handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, AddRequest):
            self.requests.append(msg)
            error = self.error
            if error is None and self.max_active is not None and len(self._active) >= self.max_active:
                error = "queue_full"
            if error is not None:
                transport.send(self._sock, RequestError(request_id=msg.request_id, code=error,
                                                        message=f"fake {error}"), identity)
                return
            tokens, finish = [], []
            for index in range(msg.sampling.n):
                reply = self.sample_replies[index] if self.sample_replies else self.reply
                ids = self.tokenizer.encode(reply, add_special_tokens=False)
                if len(ids) >= msg.sampling.max_tokens:
                    tokens.append(list(ids[:msg.sampling.max_tokens]))
                    finish.append("length")
                else:
                    tokens.append(list(ids) + [self.eos_token_id])
                    finish.append("stop")
            if msg.sampling.use_beam_search:        # as the real one: every hypothesis at once, at the end
                transport.send(self._sock, RequestOutputs(outputs=[RequestOutput(
                    msg.request_id, i, ids, reason, num_prompt_tokens=len(msg.prompt_token_ids),
                    cumulative_logprob=-1.0 - i) for i, (ids, reason) in enumerate(zip(tokens, finish))]), identity)
                self.generated += sum(map(len, tokens))
                return
            self._active[msg.request_id] = _Active(identity, msg, tokens, finish)
        elif isinstance(msg, AbortRequest) and msg.sample_index is not None:
            self.aborted_samples.append((msg.request_id, msg.sample_index))
            a = self._active.get(msg.request_id)
            if (a is not None and msg.sample_index < len(a.tokens)
                    and a.pos[msg.sample_index] < len(a.tokens[msg.sample_index])):      # still streaming
                del a.tokens[msg.sample_index][a.pos[msg.sample_index]:]
                transport.send(self._sock, RequestOutputs(outputs=[RequestOutput(
                    msg.request_id, msg.sample_index, [], "abort")]), identity)
                if a.done():
                    del self._active[msg.request_id]
        elif isinstance(msg, AbortRequest):
            self.aborted.append(msg.request_id)
            self._active.pop(msg.request_id, None)
        elif isinstance(msg, StatsRequest):
            transport.send(self._sock, SchedulerStats(
                num_running=len(self._active), num_waiting=0, num_blocks=self.num_blocks,
                num_free_blocks=self.num_blocks * 9 // 10,
                kv_cache_usage=0.1, prefix_cache_queries=10, prefix_cache_hits=4,
                prompt_tokens=sum(len(r.prompt_token_ids) for r in self.requests),
                generation_tokens=self.generated, executor_ready=self.executor_ready,
                max_model_len=self.max_model_len, block_size=16), identity)

    def _step(self) -> bool:
        """One token per unfinished, unheld sample; whether anything was sent."""
        by_identity: dict[bytes, list[RequestOutput]] = {}
        for rid, a in list(self._active.items()):
            i = a.sent
            if self.fail_after is not None and i >= self.fail_after:
                del self._active[rid]
                transport.send(self._sock, RequestError(request_id=rid, code="executor_error",
                                                        message="fake executor_error"), a.identity)
                continue
            for index, toks in enumerate(a.tokens):
                p = a.pos[index]
                if p >= len(toks) or (self.hold_after is not None and p >= self.hold_after.get(index, len(toks))):
                    continue
                a.pos[index] += 1
                last = p == len(toks) - 1
                lp = None
                if a.req.sampling.logprobs is not None:
                    k = a.req.sampling.logprobs
                    lp = [TokenLogprobs(-0.25, [toks[p] + j for j in range(k)], [-0.25 - j for j in range(k)])]
                by_identity.setdefault(a.identity, []).append(RequestOutput(
                    rid, index, [toks[p]], a.finish[index] if last else None,
                    num_prompt_tokens=len(a.req.prompt_token_ids), logprobs=lp))
                self.generated += 1
            a.sent += 1
            if a.done():
                del self._active[rid]
        for identity, outs in by_identity.items():
            transport.send(self._sock, RequestOutputs(outputs=outs), identity)
        return bool(by_identity)
