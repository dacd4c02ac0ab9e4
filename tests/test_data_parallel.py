"""`pagedserve serve --data-parallel-size 2`: two engines (a scheduler and an executor each) behind
one gateway. Each executor gets its share of the cores; requests spread over both; a shared
prefix follows the engine that holds it; one engine's death fails only its own requests."""
from __future__ import annotations

import json
import signal
import threading

import pytest

from services.launcher import cpu_cores
from tests.serve_harness import start_serve, stop_serve, stream_completion, wait_healthy
from tests.waits import wait_until

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

BS = 16


def per_engine(base: str, metric: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.labels["engine"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == metric}


def settled(base: str, metric: str) -> dict[str, float]:
    """``metric`` per engine once two reads 0.6 s apart agree (the gateway caches stats for 0.5 s)."""
    last = {}

    def same():
        nonlocal last
        now, last = last, per_engine(base, metric)
        return now == last and last

    return wait_until(same, 30, 0.6) or last




def _scheduler(launcher, index: int):
    for child in launcher.children(recursive=True):
        cmd = " ".join(child.cmdline())
        if "services.scheduler" in cmd and f"scheduler-{index}" in cmd:
            return child
    raise AssertionError(f"no scheduler-{index} under the launcher")


def test_two_engines_behind_one_gateway(tmp_path):
    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "200", "--block-size",
                                        str(BS), "--max-model-len", "4096", "--data-parallel-size", "2"], tmp_path)
    launcher = psutil.Process(proc.pid)
    try:
        wait_healthy(base, proc, log_path)          # healthy once one engine is: wait for both
        assert wait_until(lambda: per_engine(base, "pagedserve:executor_ready") == {"0": 1.0, "1": 1.0}, 120, 0.3)
        # each executor got its share of the cores (--num-threads reached both)
        threads = max(1, cpu_cores() // 2)
        assert log_path.read_text().count(f", {threads} CPU threads") == 2, log_path.read_text()[-3000:]

        # requests in flight together spread over both engines
        bodies = [{"prompt": [10 + i] * 40, "max_tokens": 24, "ignore_eos": True} for i in range(4)]
        results = []
        workers = [threading.Thread(target=lambda b=b: results.append(
            httpx.post(f"{base}/v1/completions", json=b, timeout=120))) for b in bodies]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert [r.status_code for r in results] == [200] * 4
        prompt_tokens = settled(base, "pagedserve:prompt_tokens_total")
        assert prompt_tokens.get("0", 0) > 0 and prompt_tokens.get("1", 0) > 0, prompt_tokens

        # a shared prefix (four full blocks) follows the engine that computed it first
        hits_before = settled(base, "pagedserve:prefix_cache_hits_total")
        shared = list(range(100, 100 + 4 * BS))
        for i in range(5):
            r = httpx.post(f"{base}/v1/completions", json={"prompt": shared + [200 + i] * 3, "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200
        hits = settled(base, "pagedserve:prefix_cache_hits_total")
        gained = {e: hits[e] - hits_before.get(e, 0) for e in hits}
        assert sorted(gained.values()) == [0, 4 * 4 * BS], gained       # four later requests, all on one engine

        # one engine dies: its stream fails with engine_unavailable, the other engine's finishes
        long = {"max_tokens": 400, "temperature": 1.0, "seed": 0, "logprobs": 1, "ignore_eos": True}
        streams = [([], threading.Event()) for _ in range(2)]
        threads_ = [threading.Thread(target=stream_completion, args=(base, dict(long, prompt=[30 + i] * 20), *s))
                    for i, s in enumerate(streams)]
        for t in threads_:
            t.start()
            assert streams[threads_.index(t)][1].wait(60)
        _scheduler(launcher, 0).send_signal(signal.SIGKILL)
        for t in threads_:
            t.join(120)
        ends = []
        for events, _ in streams:
            assert events[0] == 200
            errors = [json.loads(e)["error"]["code"] for e in events[1:] if e.startswith("{") and '"error"' in e]
            ends.append(errors[0] if errors else events[-1])
        assert sorted(ends) == ["[DONE]", "engine_unavailable"], ends
        # the launcher restarts it; both engines serve again
        assert wait_until(lambda: "scheduler-0 restarted" in log_path.read_text(), 60)
        assert wait_until(lambda: per_engine(base, "pagedserve:executor_ready") == {"0": 1.0, "1": 1.0}, 120, 0.3)
        for i in range(2):
            out = httpx.post(f"{base}/v1/completions", json={"prompt": [1 + i] * 5, "max_tokens": 4}, timeout=60)
            assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4
    finally:
        stop_serve(proc)
