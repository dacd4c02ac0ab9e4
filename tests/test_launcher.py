"""`pagedserve serve` supervision: restart policy, scheduler death (503, then recovery), executor
death (/health 503, then recovery), and the SIGTERM drain (in-flight requests finish, new ones get
503, exit 0)."""
from __future__ import annotations

import json
import signal
import sys
import threading

import pytest

from services.launcher import Supervisor
from tests.serve_harness import services_of, start_serve, stream_completion, wait_healthy
from tests.waits import wait_until

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")


def _exit_with(code: int, sleep: float = 0.0) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({sleep}); sys.exit({code})"]


def _supervise(sup: Supervisor, until, timeout: float = 60.0):
    """Run the supervisor's checks until ``until(reason)``; the bound only catches a hang."""
    seen = []

    def turn():
        seen.append(sup.check())
        return until(seen[-1])
    assert wait_until(turn, timeout), "condition not reached"
    return seen[-1]


def test_crashed_executor_is_restarted_until_the_bound():
    lines = []
    sup = Supervisor({"executor": _exit_with(3), "gateway": _exit_with(0, 60)}, max_restarts=2,
                     backoff=0.01, max_backoff=0.02, log=lines.append)
    sup.start_all()
    try:
        reason = _supervise(sup, lambda r: r is not None)
        assert reason == "executor exited with code 3 after 2 restarts"
        assert sup.restarts["executor"] == 2
        assert sum("restarted" in line for line in lines) == 2
    finally:
        for p in sup.procs.values():
            p.kill()
            p.wait()


def test_gateway_exit_stops_the_server():
    sup = Supervisor({"scheduler": _exit_with(0, 60), "gateway": _exit_with(1)}, log=lambda _: None)
    sup.start_all()
    try:
        assert _supervise(sup, lambda r: r is not None) == "gateway exited with code 1"
        assert sup.restarts["scheduler"] == 0
    finally:
        for p in sup.procs.values():
            p.kill()
            p.wait()




def test_scheduler_death_then_sigterm_drain(tmp_path):
    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "300",
                                        "--max-model-len", "4096", "--drain-timeout", "500"], tmp_path)
    launcher = psutil.Process(proc.pid)
    long_body = {"prompt": [5, 6, 7], "max_tokens": 2000, "temperature": 1.0, "seed": 0, "logprobs": 1,
                 "ignore_eos": True}        # logprobs: a chunk per token even when its text is empty
    try:
        wait_healthy(base, proc, log_path)
        # 1. the scheduler dies mid-stream, with the launcher stopped so it stays down: the stream
        #    ends with engine_unavailable, /health is 503 at once, a new request gets 503
        events, first = [], threading.Event()
        t = threading.Thread(target=stream_completion, args=(base, long_body, events, first))
        t.start()
        assert first.wait(60)
        launcher.suspend()
        try:
            services_of(launcher)["scheduler"].send_signal(signal.SIGKILL)
            t.join(60)
            assert not t.is_alive() and events[0] == 200
            errors = [json.loads(e)["error"] for e in events[1:] if e.startswith("{") and '"error"' in e]
            assert errors and errors[0]["code"] == "engine_unavailable", events[-3:]
            health = httpx.get(f"{base}/health", timeout=30)
            assert health.status_code == 503, health.text
            down = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
            assert down.status_code == 503 and down.json()["error"]["code"] == "engine_unavailable", down.text
        finally:
            launcher.resume()
        # 2. the launcher restarts it; the gateway serves again
        wait_healthy(base, proc, log_path, 120)
        out = httpx.post(f"{base}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=60)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4
        # 2b. the executor dies (the launcher stopped again, so it stays down): /health is 503
        #     not_ready until it is back; then the launcher restarts it and /health is 200 again
        launcher.suspend()
        try:
            services_of(launcher)["executor"].send_signal(signal.SIGKILL)
            health = wait_until(lambda: (h := httpx.get(f"{base}/health", timeout=30)).status_code == 503 and h, 60)
            assert health and health.json()["error"]["code"] == "not_ready", health
        finally:
            launcher.resume()
        wait_healthy(base, proc, log_path, 120)
        # 3. SIGTERM drains: the in-flight stream finishes, new requests and /health get 503
        events, first = [], threading.Event()
        t = threading.Thread(target=stream_completion, args=(base, long_body, events, first))
        t.start()
        assert first.wait(60)
        seen = {p.pid: p for p in services_of(launcher).values()}
        proc.send_signal(signal.SIGTERM)
        health = wait_until(lambda: (h := httpx.get(f"{base}/health", timeout=5)).status_code == 503 and h, 60)
        assert health and health.json() == {"status": "draining"}
        refused = httpx.post(f"{base}/v1/completions", json={"prompt": [1], "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"] == "1"
        t.join(500)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events[1:] if isinstance(e, str))
        assert proc.wait(timeout=60) == 0
        assert not [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "scheduler restarted" in log and "drained: no request in flight" in log


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_killed_launcher_leaves_no_orphans(tmp_path):
    """SIGKILL gives the launcher no chance to clean up: its children must still go."""
    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "64",
                                        "--max-model-len", "256"], tmp_path)
    try:
        wait_healthy(base, proc, log_path)
        children = list(services_of(psutil.Process(proc.pid)).values())
        assert len(children) == 3
    finally:
        proc.kill()
        proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, [" ".join(p.cmdline()) for p in alive]
