"""Soak: `pagedserve serve` under a mixed load with random client disconnects, gateway-side
aborts (stop strings) and one SIGKILL of the executor, loopback only.

Every request must end with a completion or a deliberate client disconnect: errors are counted
apart from disconnects and there must be none (none hangs either: each is bounded). The executor
kill must really requeue sequences (the scheduler's count, > 0, none dropped). What each leaving
client had seen when it left (no response yet, a response but no token, some tokens) and the
server's finish reasons (/metrics) are printed next to what was intended. After the
load `/metrics` shows nothing running or waiting and every KV block free; the scheduler's memory
stays flat after warm-up; SIGTERM then drains and leaves no process behind. The fast variant (a
tiny random Llama) runs in `make test`; the slow one (the default model, more requests) runs with
``--run-slow`` or PAGEDSERVE_RUN_SLOW=1. docs/RELIABILITY.md has the figures.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.serve_harness import services_of, start_serve, wait_healthy  # noqa: E402

REQUEST_TIMEOUT = 120.0          # a request still open after this counts as hung


@dataclass
class SoakResult:
    outcomes: Counter = field(default_factory=Counter)     # completed / left_<intent>
    errors: Counter = field(default_factory=Counter)       # clear errors by code (must stay empty)
    observed: Counter = field(default_factory=Counter)     # what a leaving client had seen when it left
    problems: list = field(default_factory=list)           # hangs and malformed answers
    rss_warm: int = 0
    rss_end: int = 0
    wall_s: float = 0.0
    metrics: dict = field(default_factory=dict)
    requeued: int = 0                                      # sequences the executor kill requeued


def _metrics(text: str) -> dict[str, float]:
    """name -> value; a labelled sample of request_success is keyed ``name[finished_reason]``."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            reason = s.labels.get("finished_reason")
            out[f"{s.name}[{reason}]" if reason else s.name] = s.value
    return out


def _body(rng: random.Random) -> tuple[dict, str | None]:
    """A random completion request (token-id prompt: the tiny model's vocabulary is 512) and
    how the client will leave early, if it does."""
    length = rng.choice([rng.randint(1, 8), rng.randint(20, 64), rng.randint(100, 180)])
    body = {"prompt": [rng.randint(1, 500) for _ in range(length)], "max_tokens": rng.randint(1, 32),
            "temperature": rng.choice([0.0, 0.8]), "stream": rng.random() < 0.5}
    if rng.random() < 0.15:
        body["n"] = 2
    if rng.random() < 0.1:
        body["stop"] = ["e"]                  # the gateway aborts the rest at the scheduler
    leave = None
    if rng.random() < 0.2:
        leave = rng.choice(["before_first_token", "during_prefill", "mid_stream"])
        if leave == "during_prefill":
            body["prompt"] = [rng.randint(1, 500) for _ in range(rng.randint(150, 200))]
        if leave == "mid_stream":
            body["stream"], body["max_tokens"] = True, rng.randint(8, 32)
    return body, leave


async def _one(client: httpx.AsyncClient, body: dict, leave: str | None, rng: random.Random,
               result: SoakResult) -> None:
    seen = {"response": False, "tokens": 0}

    async def run() -> str:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            seen["response"] = True
            if resp.status_code != 200:
                err = json.loads(await resp.aread())["error"]
                assert err["message"] and err["type"], err
                result.errors[f"{resp.status_code} {err.get('code')}"] += 1
                return "error"
            if not body["stream"]:
                out = json.loads(await resp.aread())
                assert len(out["choices"]) == body.get("n", 1)
                assert all(c["finish_reason"] in ("stop", "length") for c in out["choices"]), out
                return "completed"
            finished, chunks = set(), 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    assert len(finished) == body.get("n", 1), (finished, body)
                    return "completed"
                event = json.loads(line[6:])
                if "error" in event:
                    assert event["error"]["message"], event
                    result.errors[f"stream {event['error'].get('code')}"] += 1
                    return "error"
                chunks += 1
                seen["tokens"] += 1
                for choice in event["choices"]:
                    if choice["finish_reason"]:
                        finished.add(choice["index"])
                if leave == "mid_stream" and chunks >= rng.randint(1, 3):
                    result.observed["after some tokens"] += 1
                    return "left_mid_stream"
            raise AssertionError("stream ended without [DONE]")

    try:
        if leave in ("before_first_token", "during_prefill"):
            try:
                outcome = await asyncio.wait_for(run(), rng.uniform(0.0, 0.05))
            except asyncio.TimeoutError:
                outcome = f"left_{leave}"
                result.observed["after some tokens" if seen["tokens"] else
                                "response but no token" if seen["response"] else "no response yet"] += 1
        else:
            outcome = await asyncio.wait_for(run(), REQUEST_TIMEOUT)
    except asyncio.TimeoutError:
        result.problems.append(("hung", body))
        return
    except (AssertionError, ValueError, KeyError, httpx.HTTPError) as e:
        result.problems.append((repr(e), body))
        return
    result.outcomes[outcome] += 1


async def _load(base: str, num_requests: int, concurrency: int, seed: int, scheduler: psutil.Process,
                kill_executor, result: SoakResult) -> None:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    done = 0
    warm_after, kill_after = num_requests // 5, num_requests * 2 // 5

    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        async def guarded(i: int) -> None:
            nonlocal done
            body, leave = _body(random.Random(seed * 100_003 + i))
            async with sem:
                await _one(client, body, leave, random.Random(i), result)
            done += 1
            if done == warm_after:
                result.rss_warm = scheduler.memory_info().rss
            if done == kill_after:
                kill_executor()

        await asyncio.gather(*(guarded(i) for i in range(num_requests)))
        for _ in range(300):                               # drained: aborts and frees have landed
            m = _metrics((await client.get("/metrics")).text)
            if m.get("pagedserve:num_requests_running") == 0 and m.get("pagedserve:num_requests_waiting") == 0 \
                    and m.get("pagedserve:num_free_blocks") == m.get("pagedserve:num_total_blocks"):
                break
            await asyncio.sleep(0.1)
        result.metrics = m
        result.rss_end = scheduler.memory_info().rss


def soak(tmp_path, model: str, num_requests: int, concurrency: int, seed: int = 0) -> SoakResult:
    proc, base, log_path = start_serve([model, "--device", "cpu", "--num-blocks", "96", "--max-model-len", "256",
                                        "--max-num-seqs", "32", "--max-restarts", "2", "--drain-timeout", "20"],
                                       tmp_path)
    launcher = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    result = SoakResult()
    try:
        wait_healthy(base, proc, log_path, 300)
        services = services_of(launcher)
        seen.update({p.pid: p for p in services.values()})
        killed = []

        def kill_executor() -> None:
            executor = services_of(launcher)["executor"]
            executor.send_signal(signal.SIGKILL)
            killed.append(executor.pid)

        start = time.monotonic()
        asyncio.run(_load(base, num_requests, concurrency, seed, services["scheduler"], kill_executor, result))
        result.wall_s = time.monotonic() - start
        now = services_of(launcher)
        seen.update({p.pid: p for p in now.values()})
        assert killed and now["executor"].pid != killed[0], "the executor was not restarted"
        assert now["scheduler"].pid == services["scheduler"].pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    orphans = [p.pid for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not orphans, f"processes left behind: {orphans}"
    assert not list(tmp_path.glob("pagedserve-*")), "socket directory left behind"
    assert "executor restarted" in log, log[-3000:]
    recoveries = [(int(a), int(b)) for a, b in re.findall(r"(\d+) sequences requeued for recompute, (\d+) dropped", log)]
    assert recoveries, log[-3000:]
    result.requeued = sum(a for a, _ in recoveries)
    assert result.requeued > 0 and all(b == 0 for _, b in recoveries), recoveries
    return result


def check(result: SoakResult, num_requests: int) -> None:
    assert not result.problems, result.problems[:5]
    assert not result.errors, f"errors (not disconnects): {dict(result.errors)}"
    assert sum(result.outcomes.values()) == num_requests
    assert result.outcomes["completed"] > 0
    m = result.metrics
    assert m["pagedserve:num_requests_running"] == 0 and m["pagedserve:num_requests_waiting"] == 0, m
    assert m["pagedserve:num_free_blocks"] == m["pagedserve:num_total_blocks"] > 0, m
    assert m["pagedserve:executor_ready"] == 1
    # a leak check, not a timing threshold: the scheduler's RSS after warm-up and at the end
    assert result.rss_end - result.rss_warm < 50 * 2**20, (result.rss_warm, result.rss_end)
    left = sum(v for k, v in result.outcomes.items() if k.startswith("left_"))
    assert sum(result.observed.values()) == left
    finished = {k.split("[")[1][:-1]: int(v) for k, v in m.items()
                if k.startswith("pagedserve:request_success_total[")}
    print(f"\nsoak: {num_requests} requests in {result.wall_s:.1f}s; outcomes {dict(result.outcomes)} "
          f"({left} client disconnects; when they left, the client had seen: {dict(result.observed)}); "
          f"server finish reasons {finished}; errors {dict(result.errors)}; "
          f"{result.requeued} sequences requeued on the executor kill; scheduler RSS "
          f"{result.rss_warm / 2**20:.1f} -> {result.rss_end / 2**20:.1f} MiB; "
          f"preemptions {m.get('pagedserve:num_preemptions_total', 0):.0f}")


def test_soak_fast(tmp_path):
    num = 500
    check(soak(tmp_path, "random:tiny", num, concurrency=24, seed=1), num)


@pytest.mark.slow
@pytest.mark.timeout(3600)     # thousands of requests with the real model: past the suite's 600 s per test
def test_soak_slow_default_model(tmp_path, default_model_source):
    num = int(os.environ.get("PAGEDSERVE_SOAK_REQUESTS", "3000"))
    check(soak(tmp_path, "", num, concurrency=32, seed=2), num)
