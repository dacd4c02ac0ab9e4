"""`pagedserve serve --tensor-parallel-size 2`: a rank killed mid-stream is a dead executor; the
launcher starts a new group, the scheduler recomputes, and the stream ends as it would have.
(Token-for-token equality with HF: tests/test_model_families.py.)"""
from __future__ import annotations

import json
import signal
import threading

import pytest

from tests.serve_harness import start_serve, stop_serve, stream_completion, wait_healthy
from tests.waits import wait_until

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")




def _rank(launcher, rank: int):
    for child in launcher.children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "services.executor" in " ".join(cmd) and cmd[-4:-2] == ["--rank", str(rank)]:
            return child
    return None


def test_a_killed_rank_restarts_the_group_and_the_stream_goes_on(tmp_path):
    proc, base, log_path = start_serve(["random:tiny", "--device", "cpu", "--num-blocks", "200", "--max-model-len",
                                        "4096", "--tensor-parallel-size", "2"], tmp_path)
    launcher = psutil.Process(proc.pid)
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 300, "temperature": 1.0, "seed": 7, "logprobs": 1,
            "ignore_eos": True}
    try:
        wait_healthy(base, proc, log_path)
        follower = _rank(launcher, 1)
        assert follower is not None, "no rank 1 under the executor"
        events, started = [], threading.Event()
        t = threading.Thread(target=stream_completion, args=(base, body, events, started, 20))
        t.start()
        assert started.wait(60)
        follower.send_signal(signal.SIGKILL)
        t.join(180)
        assert not t.is_alive() and events[0] == 200
        chunks = [json.loads(e) for e in events[1:] if e.startswith("{")]
        assert not [c for c in chunks if "error" in c], chunks[-2:]
        assert events[-1] == "[DONE]"
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) == 300
        log = log_path.read_text()
        assert "executor restarted" in log, log[-3000:]
        new = wait_until(lambda: (r := _rank(launcher, 1)) is not None and r.pid != follower.pid and r, 60)
        assert new, "the new group has no rank 1"
        # the same seeded request again, uninterrupted: the same text
        again = httpx.post(f"{base}/v1/completions", json=body, timeout=180)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == streamed
    finally:
        stop_serve(proc)


def test_the_ranks_wait_for_the_next_plan_past_the_collective_timeout(monkeypatch):
    """Ranks 1..N-1 wait for plans in a control group without a timeout, so an idle spell longer
    than the model collectives' timeout (here 2 s) breaks nothing."""
    import time

    from services.executor.parallel import TIMEOUT_ENV
    from services.offline import Engine
    from shared.config import CacheConfig, EngineConfig
    from shared.messages import AddRequest, SamplingParams

    monkeypatch.setenv(TIMEOUT_ENV, "2")
    engine = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", tensor_parallel_size=2,
                                 cache=CacheConfig(block_size=16, num_blocks=32)).validate())
    followers = engine.group.followers
    try:
        def once(rid: str) -> list[int]:
            request = AddRequest(request_id=rid, prompt_token_ids=[3, 4, 5, 6],
                                 sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            return engine.run([request])[rid][0].token_ids

        first = once("a")
        time.sleep(4)
        assert once("b") == first and len(first) == 6
        assert all(p.poll() is None for p in followers)
    finally:
        engine.close()
    assert [p.returncode for p in followers] == [0]          # ended by the shutdown broadcast
