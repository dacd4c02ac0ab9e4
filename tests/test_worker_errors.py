"""Malformed plans get ExecutorError, change nothing, and the worker keeps working.

Uses random weights (``random:tiny``): fast, and exercises the random-weights path."""
from __future__ import annotations

import copy

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


BAD_PLANS = {
    "run unknown seq": (StepPlan(step_id=1, run_seq_ids=[1, 9], run_num_tokens=[1, 1]), "unknown seq 9"),
    "run lengths differ": (StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[]), "differ in length"),
    "run twice": (StepPlan(step_id=1, run_seq_ids=[1, 1], run_num_tokens=[1, 1]), "twice"),
    "too many tokens for seq": (StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[2]), "known"),
    "zero tokens": (StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[0]), "0 tokens"),
    "new seq already known": (
        StepPlan(step_id=1, new=[NewSeq(1, [1, 2], [], [2], 0, 2, GREEDY)]), "already known"),
    "new seq duplicated": (
        StepPlan(step_id=1, new=[NewSeq(2, [1], [], [2], 0, 1, GREEDY), NewSeq(2, [1], [], [3], 0, 1, GREEDY)]),
        "already known"),
    "new seq block outside pool": (
        StepPlan(step_id=1, new=[NewSeq(2, [1, 2], [], [16], 0, 2, GREEDY)], run_seq_ids=[1],
                 run_num_tokens=[1]), "block 16 outside"),
    "new seq computes more than it has": (
        StepPlan(step_id=1, new=[NewSeq(2, [1, 2], [], [2], 1, 2, GREEDY)]), "known"),
    "table update block outside pool": (
        StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[1], table_updates=[TableUpdate(1, 2, [99])]),
        "block 99 outside"),
    "table update unknown seq": (
        StepPlan(step_id=1, table_updates=[TableUpdate(7, 0, [3])]), "unknown seq 7"),
    "table update beyond end": (
        StepPlan(step_id=1, table_updates=[TableUpdate(1, 3, [3])]), "beyond"),
    "not enough blocks": (
        StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[1], table_updates=[TableUpdate(1, 1, [])]),
        "cannot hold"),
    "copy outside pool": (StepPlan(step_id=1, copies=[(0, 16)]), "outside"),
    "copy duplicate destination": (StepPlan(step_id=1, copies=[(0, 5), (1, 5)]), "duplicate"),
    "swap out to host outside pool": (StepPlan(step_id=1, swap_out=[(0, 4)]), "host block 4"),
    "swap in from device outside pool": (StepPlan(step_id=1, swap_in=[(0, 20)]), "block 20"),
    "finished unknown": (StepPlan(step_id=1, finished=[3]), "unknown seq 3"),
    "finished twice": (StepPlan(step_id=1, finished=[1], preempted=[1]), "duplicate"),
    "run after finish": (StepPlan(step_id=1, finished=[1], run_seq_ids=[1], run_num_tokens=[1]), "unknown seq 1"),
    "fork parent not sampling": (
        StepPlan(step_id=1, forks=[Fork(1, 2, 1)]), "does not sample"),
    "fork child known": (
        StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[1], forks=[Fork(1, 1, 1)]), "already known"),
    "prompt token outside the vocabulary": (
        StepPlan(step_id=1, new=[NewSeq(2, [1, 10**6], [], [2], 0, 2, GREEDY)]), "outside the vocabulary"),
    "logit_bias token outside the vocabulary": (
        StepPlan(step_id=1, new=[NewSeq(2, [1, 2], [], [2], 0, 2,
                                        SamplingParams(temperature=0.0, logit_bias={10**6: 1.0}))]),
        "logit_bias token id"),
    "beyond max_model_len": (
        StepPlan(step_id=1, new=[NewSeq(2, list(range(65)), [], list(range(2, 16)) + [0, 1, 2], 0, 65,
                                        GREEDY)]), "max_model_len"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_is_rejected_and_changes_nothing(worker, name):
    plan, needle = BAD_PLANS[name]
    before = snapshot(worker)
    result = worker.execute(plan)
    assert isinstance(result, ExecutorError), result
    assert result.step_id == plan.step_id
    assert needle in result.message
    assert_same(worker, before)
    # still usable: the same decode the untouched worker would run
    good = worker.execute(ok_decode(2))
    assert isinstance(good, StepResult) and good.seq_ids == [1]


def test_rejected_plan_then_same_tokens_as_untouched(tiny_config, worker):
    other = Worker.from_loaded(worker.loaded, tiny_config)
    other.execute(StepPlan(step_id=0, new=[NewSeq(1, [5, 6, 7, 8, 9, 10], [], [0, 1], 0, 6, GREEDY)]))
    worker.execute(BAD_PLANS["run unknown seq"][0])
    for step in range(1, 3):               # 2 blocks of 4 hold 8 tokens
        a, b = worker.execute(ok_decode(step)), other.execute(ok_decode(step))
        assert a.token_ids == b.token_ids


def test_ready_and_random_model(worker):
    ready = worker.ready()
    assert isinstance(ready, ExecutorReady)
    assert (ready.block_size, ready.num_blocks, ready.num_host_blocks) == (BS, 16, 4)
    assert ready.max_model_len == 64 and ready.vocab_size == 512 and ready.eos_token_ids == [0]
    assert ready.model == "random:tiny" and ready.device == "cpu"


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
