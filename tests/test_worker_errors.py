"""The worker's handshake, state after errors, and its ZMQ loop (one rule per bad plan: tests/test_step_check.py).

Uses random weights (``random:tiny``): fast, and exercises the random-weights path."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from shared.config import CacheConfig, EngineConfig, SchedulerConfig
from shared.messages import (
    ExecutorError, ExecutorReady, Fork, NewSeq, SamplingParams, StepPlan, StepResult, TableUpdate,
)
from services.executor.worker import Worker

GREEDY = SamplingParams(temperature=0.0)
BS = 4


@pytest.fixture(scope="module")
def tiny_config():
    return EngineConfig(model="random:tiny", device="cpu", dtype="float32", attention_backend="torch",
                        cache=CacheConfig(block_size=BS, num_blocks=16, num_host_blocks=4),
                        scheduler=SchedulerConfig(max_model_len=64, max_num_batched_tokens=64)).validate()


@pytest.fixture()
def worker(tiny_config):
    """Seq 1 (6 prompt tokens, 2 blocks) has run its prefill and sampled one token."""
    w = Worker(tiny_config)
    r = w.execute(StepPlan(step_id=0, new=[NewSeq(1, [5, 6, 7, 8, 9, 10], [], [0, 1], 0, 6, GREEDY)]))
    assert isinstance(r, StepResult) and r.seq_ids == [1]
    return w


def snapshot(w: Worker):
    return copy.deepcopy(w.seqs), [c.clone() for c in w.kv.device_caches], \
        [c.clone() for c in w.kv.host_caches]


def assert_same(w: Worker, snap):
    seqs, dev, host = snap
    assert w.seqs == seqs
    assert all(torch.equal(a, b) for a, b in zip(w.kv.device_caches, dev))
    assert all(torch.equal(a, b) for a, b in zip(w.kv.host_caches, host))


def ok_decode(step_id=1) -> StepPlan:
    return StepPlan(step_id=step_id, run_seq_ids=[1], run_num_tokens=[1])


def test_rejected_plan_then_same_tokens_as_untouched(tiny_config, worker):
    other = Worker.from_loaded(worker.loaded, tiny_config)
    other.execute(StepPlan(step_id=0, new=[NewSeq(1, [5, 6, 7, 8, 9, 10], [], [0, 1], 0, 6, GREEDY)]))
    before = snapshot(worker)
    assert isinstance(worker.execute(StepPlan(step_id=1, run_seq_ids=[1, 9], run_num_tokens=[1, 1])), ExecutorError)
    assert_same(worker, before)
    for step in range(1, 3):               # 2 blocks of 4 hold 8 tokens
        a, b = worker.execute(ok_decode(step)), other.execute(ok_decode(step))
        assert a.token_ids == b.token_ids


def test_ready_and_random_model(worker):
    ready = worker.ready()
    assert isinstance(ready, ExecutorReady)
    assert (ready.block_size, ready.num_blocks, ready.num_host_blocks) == (BS, 16, 4)
    assert ready.max_model_len == 64 and ready.vocab_size == 512 and ready.eos_token_ids == [0]
    assert ready.model == "random:tiny" and ready.device == "cpu"


def test_ready_reports_the_models_uniform_sliding_window(worker, monkeypatch):
    assert worker.ready().sliding_window == worker.model_config.uniform_window == 0
    windowed = SimpleNamespace(vocab_size=worker.model_config.vocab_size, uniform_window=64)
    monkeypatch.setattr(worker, "model_config", windowed)      # a Mistral-like config
    assert worker.ready().sliding_window == 64


def test_same_seed_same_random_weights(tiny_config, worker):
    again = Worker(tiny_config)
    for a, b in zip(worker.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_finished_and_preempted_state_is_dropped_and_resume_works(worker):
    r = worker.execute(StepPlan(step_id=1, preempted=[1]))
    assert isinstance(r, StepResult) and r.seq_ids == [] and not worker.seqs
    # resume after recompute: prompt + the one output, recomputed from scratch into new blocks
    r = worker.execute(StepPlan(step_id=2, new=[NewSeq(1, [5, 6, 7, 8, 9, 10], [3], [4, 5], 0, 7, GREEDY)]))
    assert isinstance(r, StepResult) and r.seq_ids == [1]
    assert worker.seqs[1].output == [3, r.token_ids[0]]
    worker.execute(StepPlan(step_id=3, finished=[1]))
    assert not worker.seqs


def test_service_answers_bad_frames_and_keeps_serving(worker):
    """The ZMQ loop: hello -> ready, garbage -> ExecutorError, plan -> result, shutdown -> 0."""
    import threading

    import zmq

    from services.executor.service import serve
    from shared import transport
    from shared.messages import ExecutorHello, Shutdown

    ctx = zmq.Context()
    addr = "inproc://executor-test"
    sock = transport.router(ctx, addr)
    code = []
    thread = threading.Thread(target=lambda: code.append(serve(worker, sock)), daemon=True)
    thread.start()
    client = transport.dealer(ctx, addr)
    try:
        transport.send(client, ExecutorHello(block_size=BS))
        assert isinstance(transport.recv(client), ExecutorReady)
        transport.send(client, ok_decode(4))        # a hello opens a new conversation: seq 1 is gone
        assert "unknown seq 1" in transport.recv(client).message
        transport.send(client, StepPlan(step_id=4, new=[NewSeq(1, [5, 6, 7, 8, 9, 10], [], [0, 1], 0, 6, GREEDY)]))
        assert isinstance(transport.recv(client), StepResult)
        client.send(b"\x00garbage")
        err = transport.recv(client)
        assert isinstance(err, ExecutorError) and err.step_id == -1
        transport.send(client, ExecutorHello(block_size=BS * 2))
        assert "block size" in transport.recv(client).message
        transport.send(client, StepPlan(step_id=5, run_seq_ids=[42], run_num_tokens=[1]))
        assert "unknown seq 42" in transport.recv(client).message
        transport.send(client, ok_decode(6))
        res = transport.recv(client)
        assert isinstance(res, StepResult) and res.step_id == 6 and res.seq_ids == [1]
        transport.send(client, Shutdown())
        thread.join(timeout=10)
        assert code == [0]
    finally:
        client.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def test_cli_help():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "services.executor", "--help"], capture_output=True,
                         text=True, cwd=root, check=True).stdout
    for flag in ("--addr", "--model", "--dtype", "--device", "--block-size", "--num-blocks",
                 "--kv-cache-memory", "--gpu-memory-utilization", "--max-model-len",
                 "--attention-backend", "--seed"):
        assert flag in out
    assert "{auto,torch,cpu,cuda}" in out


def test_engine_config_rejects_an_unknown_attention_backend():
    from shared.config import ConfigError

    for name in ("auto", "torch", "cpu", "cuda"):
        EngineConfig(attention_backend=name).validate()
    with pytest.raises(ConfigError, match="attention_backend must be one of auto, torch, cpu, cuda"):
        EngineConfig(attention_backend="flash").validate()


def test_resumed_sample_keeps_its_own_seeded_stream(tiny_config, worker):
    """A forked sample resumed by NewSeq (recompute preemption, or a restarted executor) samples
    from its own seeded stream: its sample_index travels on NewSeq."""
    params = SamplingParams(temperature=1.0, seed=7, n=2)
    prompt = [5, 6, 7, 8, 9, 10]
    w = Worker.from_loaded(worker.loaded, tiny_config)
    r = w.execute(StepPlan(step_id=0, new=[NewSeq(1, prompt, [], [0, 1], 0, 6, params)], forks=[Fork(1, 2, 1)]))
    first = dict(zip(r.seq_ids, r.token_ids))
    r = w.execute(StepPlan(step_id=1, run_seq_ids=[1, 2], run_num_tokens=[1, 1],
                           table_updates=[TableUpdate(2, 1, [2])], copies=[(1, 2)]))
    second = dict(zip(r.seq_ids, r.token_ids))

    fresh = Worker.from_loaded(worker.loaded, tiny_config)
    r = fresh.execute(StepPlan(step_id=0, new=[NewSeq(2, prompt, [first[2]], [3, 4], 0, 7, params, 1)]))
    assert r.token_ids == [second[2]]


@pytest.mark.parametrize("argv,refused", [
    (["--rank", "2", "--dist-init", "tcp://127.0.0.1:1"], "--rank 2 is not below --tensor-parallel-size 2"),
    (["--rank", "1"], "--rank needs --dist-init tcp://HOST:PORT"),
])
def test_a_tensor_parallel_rank_that_cannot_be_is_a_cli_error(argv, refused, capsys):
    from services.cli import main
    assert main(["executor", "--model", "random:tiny", "--device", "cpu", "--tensor-parallel-size", "2", *argv]) == 2
    assert refused in capsys.readouterr().err
