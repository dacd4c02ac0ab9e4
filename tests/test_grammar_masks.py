"""Grammar token masks on the executor: the sampler applies them (services/executor/sampler.py),
the worker takes them inline or deferred (worker.py), the ZMQ loop receives a deferred StepMasks
frame (service.py). The worker runs random ``tiny`` weights (512 tokens, a multiple of 32); the
sampler tests also use vocabularies that are not."""
from __future__ import annotations

import threading

import msgspec
import numpy as np
import pytest
import torch

from services.executor.sampler import Sampler, SamplingMetadata, apply_grammar_masks, unpack_masks
from services.executor.worker import Worker
from shared.config import CacheConfig, EngineConfig, SchedulerConfig
from shared.messages import ExecutorError, Fork, NewSeq, StepMasks, StepPlan, StepResult
from shared.messages import SamplingParams as SP

sampler = Sampler()
GREEDY = SP(temperature=0.0)


def mask_bytes(allowed: list[set[int]], vocab_size: int, padding: bool = False) -> bytes:
    """The wire rows (StepPlan.masks) allowing ``allowed[i]`` in row i; ``padding``: also set
    the bits past the vocabulary, which the executor must ignore."""
    words = -(-vocab_size // 32)
    bits = np.zeros((len(allowed), 32 * words), dtype=np.uint8)
    for i, tokens in enumerate(allowed):
        bits[i, sorted(tokens)] = 1
    if padding:
        bits[:, vocab_size:] = 1
    return np.packbits(bits, axis=1, bitorder="little").view("<i4").tobytes()


def allowed_by_words(data: bytes, num_rows: int, vocab_size: int) -> list[set[int]]:
    """The wire definition read literally: bit t % 32 of little-endian int32 word t // 32."""
    words = np.frombuffer(data, dtype="<i4").reshape(num_rows, -1).tolist()
    return [{t for t in range(vocab_size) if (row[t // 32] >> (t % 32)) & 1} for row in words]


def logits_of(B: int, V: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3.0


def run(logits, params, masks=None):
    return sampler(logits, SamplingMetadata.build([(p, [], [], 0) for p in params], "cpu", masks))


# --------------------------------------------------------------------------------------------
# The wire format


def test_mask_helper_writes_little_endian_words():
    data = mask_bytes([{0, 31, 33, 69}], 70)
    assert len(data) == 3 * 4                                    # ceil(70 / 32) words
    assert np.frombuffer(data, dtype="<i4").tolist() == [1 - 2**31, 2, 1 << 5]   # bit 31 is the sign
    assert allowed_by_words(data, 1, 70) == [{0, 31, 33, 69}]


@pytest.mark.parametrize("V", [1, 31, 32, 33, 70, 512])
def test_unpack_matches_the_word_definition(V):
    rng = np.random.default_rng(V)
    words = rng.integers(-2**31, 2**31, size=(4, -(-V // 32)), dtype=np.int64).astype("<i4")
    data = words.tobytes()
    allowed = unpack_masks(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(4, -1), V)
    assert allowed.shape == (4, V) and allowed.dtype == torch.bool
    assert [set(torch.nonzero(r).flatten().tolist()) for r in allowed] == allowed_by_words(data, 4, V)


def test_build_refuses_bytes_that_do_not_split_into_rows():
    with pytest.raises(ValueError, match="do not split into 2 rows"):
        SamplingMetadata.build([(GREEDY, [], [], 0)] * 2, "cpu", ([0, 1], b"\0" * 6))


# --------------------------------------------------------------------------------------------
# The sampler

ROWS = [SP(temperature=0.0, logprobs=3), SP(temperature=1.0, seed=7), SP(temperature=0.7, seed=8, top_k=5),
        SP(temperature=1.2, seed=9, top_p=0.8, logprobs=2), SP(temperature=0.0), SP(temperature=1.0, seed=10)]


@pytest.mark.parametrize("V", [100, 128])
def test_masked_rows_sample_only_allowed_tokens_and_the_rest_are_unchanged(V):
    logits = logits_of(len(ROWS), V)
    top = logits.argsort(-1, descending=True)
    # rows 0, 1, 3, 4 masked, in a scrambled order; none of them allows its row's 3 best tokens
    mask_rows = [3, 0, 4, 1]
    allowed = [set(top[r, 3:3 + k].tolist()) for r, k in zip(mask_rows, (4, 1, 7, 20))]
    plain = run(logits, ROWS)
    for seed in range(5):
        params = [p if p.seed is None else msgspec.structs.replace(p, seed=p.seed + 100 * seed) for p in ROWS]
        masked = run(logits, params, (mask_rows, mask_bytes(allowed, V)))
        unmasked = run(logits, params)
        tokens = masked.token_ids.tolist()
        for r, ok in zip(mask_rows, allowed):
            assert tokens[r] in ok, (seed, r)
        for r in (2, 5):                                  # seeded, unmasked: the same draw
            assert tokens[r] == unmasked.token_ids[r].item()
    # greedy rows: the best allowed token; logprobs still describe the model's distribution
    raw = logits.log_softmax(-1)
    masked = run(logits, ROWS, (mask_rows, mask_bytes(allowed, V)))
    assert masked.token_ids[0].item() == max(allowed[1], key=lambda t: logits[0, t].item())
    assert masked.token_ids[4].item() == max(allowed[2], key=lambda t: logits[4, t].item())
    for r in (0, 3):
        got, ref = masked.logprobs[r], plain.logprobs[r]
        assert got.top_token_ids == ref.top_token_ids and got.top_logprobs == ref.top_logprobs
        assert got.logprob == pytest.approx(raw[r, masked.token_ids[r]].item(), abs=1e-6)
        assert masked.token_ids[r].item() not in got.top_token_ids      # the model preferred others


def test_fast_greedy_path_respects_the_masks():
    V = 70
    logits = logits_of(4, V, seed=1)
    top = logits.argsort(-1, descending=True)
    allowed = [set(top[2, 10:13].tolist()), set(top[0, 40:41].tolist())]
    meta = SamplingMetadata.build([(GREEDY, [], [], 0)] * 4, "cpu", ([2, 0], mask_bytes(allowed, V)))
    assert meta.fast_greedy and meta.any_mask
    tokens = sampler(logits, meta).token_ids.tolist()
    assert tokens[2] == max(allowed[0], key=lambda t: logits[2, t].item())
    assert tokens[0] == top[0, 40].item()
    assert tokens[1] == top[1, 0].item() and tokens[3] == top[3, 0].item()


@pytest.mark.parametrize("params", [
    SP(temperature=0.0), SP(temperature=0.0, logprobs=1), SP(temperature=1.5, seed=1),
    SP(temperature=1.0, top_k=1), SP(temperature=1.0, top_p=0.01, min_p=0.5),
    SP(temperature=1.0, repetition_penalty=1.5, frequency_penalty=2.0, presence_penalty=1.0),
    SP(temperature=0.0, logit_bias={13: -100.0}),
], ids=["greedy", "greedy-logprobs", "sampled", "top-k", "top-p-min-p", "penalties", "bias-against"])
def test_a_mask_allowing_one_token_always_gets_it(params):
    V = 45                                               # 2 words, 19 padding bits
    logits = logits_of(3, V, seed=2)
    logits[:, 13] = -30.0                                # the model's least likely token
    rows = [(params, [13, 1], [13, 2], 0)] * 3
    for padding in (False, True):
        meta = SamplingMetadata.build(rows, "cpu", ([0, 1, 2], mask_bytes([{13}] * 3, V, padding)))
        assert sampler(logits, meta).token_ids.tolist() == [13, 13, 13]


def test_padding_bits_past_the_vocabulary_are_ignored():
    V = 33                                               # one real bit in the second word
    logits = torch.zeros(2, V)
    logits[:, 0] = 5.0
    meta = SamplingMetadata.build([(GREEDY, [], [], 0), (SP(temperature=1.0, seed=3), [], [], 0)], "cpu",
                                  ([0, 1], mask_bytes([{32}, {32}], V, padding=True)))
    masked = apply_grammar_masks(logits, meta)
    assert masked.shape == (2, V) and torch.isinf(masked[:, :32]).all() and (masked[:, 32] == 0).all()
    assert sampler(logits, meta).token_ids.tolist() == [32, 32]


def test_masking_puts_minus_inf_on_disallowed_tokens_and_leaves_its_input():
    V = 40
    logits = logits_of(3, V, seed=4)
    before = logits.clone()
    meta = SamplingMetadata.build([(GREEDY, [], [], 0)] * 3, "cpu", ([1], mask_bytes([{0, 5, 39}], V)))
    out = apply_grammar_masks(logits, meta)
    assert torch.equal(logits, before)
    finite = torch.isfinite(out)
    assert finite[1].nonzero().flatten().tolist() == [0, 5, 39]
    assert torch.equal(out[[0, 2]], before[[0, 2]]) and torch.equal(out[1, [0, 5, 39]], before[1, [0, 5, 39]])
    # no masks: the logits themselves
    assert apply_grammar_masks(logits, SamplingMetadata.build([(GREEDY, [], [], 0)] * 3, "cpu")) is logits


# --------------------------------------------------------------------------------------------
# The worker (random tiny weights: 512 tokens)

BS, VOCAB = 4, 512
PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def tiny_worker():
    cfg = EngineConfig(model="random:tiny", device="cpu", dtype="float32", attention_backend="torch",
                       cache=CacheConfig(block_size=BS, num_blocks=16, num_host_blocks=4),
                       scheduler=SchedulerConfig(max_model_len=64, max_num_batched_tokens=64)).validate()
    w = Worker(cfg)
    assert w.model_config.vocab_size == VOCAB
    return w


@pytest.fixture
def fresh(tiny_worker):
    """A new worker (own state and cache) around the module's model."""
    return lambda: Worker.from_loaded(tiny_worker.loaded, tiny_worker.config)


def prefill(sid=1, sampling=GREEDY, blocks=(0, 1), **plan) -> StepPlan:
    return StepPlan(step_id=0, new=[NewSeq(sid, PROMPT, [], list(blocks), 0, len(PROMPT), sampling)], **plan)


def test_inline_masks_then_deferred_masks(fresh):
    w, ref = fresh(), fresh()
    plain = ref.execute(prefill()).token_ids[0]
    allowed = {t for t in (3, 99, 400) if t != plain}
    r = w.execute(prefill(mask_seq_ids=[1], masks=mask_bytes([allowed], VOCAB)))
    assert isinstance(r, StepResult) and r.token_ids[0] in allowed
    first = r.token_ids[0]

    calls = []

    def masks() -> bytes:
        calls.append(w.seqs[1].num_computed)             # asked after the forward pass
        return mask_bytes([{17}], VOCAB)

    r = w.execute(StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[1], mask_seq_ids=[1]), masks)
    assert isinstance(r, StepResult) and r.token_ids == [17] and calls == [len(PROMPT) + 1]
    assert w.seqs[1].output == [first, 17]


def test_unmasked_seqs_sample_as_without_masks(fresh):
    two = StepPlan(step_id=0, new=[NewSeq(1, PROMPT, [], [0, 1], 0, 6, GREEDY),
                                   NewSeq(2, PROMPT[::-1], [], [2, 3], 0, 6, GREEDY)])
    plain = fresh().execute(two).token_ids
    masked = fresh().execute(StepPlan(step_id=0, new=two.new, mask_seq_ids=[2],
                                      masks=mask_bytes([{plain[1] ^ 1}], VOCAB)))
    assert masked.token_ids == [plain[0], plain[1] ^ 1]


def test_deferred_masks_without_a_source_or_of_the_wrong_size_fail_the_step(fresh):
    """No source: refused like a bad plan. A wrong size or a failing source: after the forward."""
    w = fresh()
    deferred = prefill(mask_seq_ids=[1])
    err = w.execute(deferred)
    assert isinstance(err, ExecutorError) and err.step_id == 0
    assert "deferred to a StepMasks frame" in err.message and "no source" in err.message
    assert w.seqs == {}                                          # refused before the forward

    w = fresh()
    err = w.execute(deferred, lambda: mask_bytes([{1}, {2}], VOCAB))
    assert isinstance(err, ExecutorError) and "deferred masks: 128 bytes" in err.message
    assert "take 64" in err.message
    assert w.seqs[1].num_computed == len(PROMPT) and w.seqs[1].output == []   # the forward had run

    err = fresh().execute(deferred, lambda: (_ for _ in ()).throw(TimeoutError("no frame")))
    assert isinstance(err, ExecutorError) and "TimeoutError: no frame" in err.message


def test_inline_masks_of_the_wrong_size_are_refused_before_anything_runs(fresh):
    w = fresh()
    err = w.execute(prefill(mask_seq_ids=[1], masks=b"\xff" * 60))
    assert isinstance(err, ExecutorError) and "masks: 60 bytes" in err.message
    assert w.seqs == {}


def test_a_mask_for_a_seq_that_does_not_sample_is_refused(fresh):
    w = fresh()
    called = []
    chunk = StepPlan(step_id=0, new=[NewSeq(1, PROMPT, [], [0, 1], 0, 4, GREEDY)],   # 4 of 6 prompt tokens
                     mask_seq_ids=[1])
    err = w.execute(chunk, lambda: called.append(1) or mask_bytes([{1}], VOCAB))
    assert isinstance(err, ExecutorError) and "does not sample in this step" in err.message
    assert w.seqs == {} and not called


def test_a_fork_child_masked_alone(fresh):
    plan = prefill(forks=[Fork(1, 2, 1)])
    plain = fresh().execute(plan).token_ids
    assert plain[0] == plain[1]                                  # greedy siblings agree unmasked
    bad = (plain[0] + 1) % VOCAB
    w = fresh()
    r = w.execute(prefill(forks=[Fork(1, 2, 1)], mask_seq_ids=[2]), lambda: mask_bytes([{bad}], VOCAB))
    assert isinstance(r, StepResult) and r.seq_ids == [1, 2] and r.token_ids == [plain[0], bad]
    assert w.seqs[2].output == [bad] and w.seqs[1].output == [plain[0]]


def test_masks_for_parent_and_child_follow_mask_seq_ids_order(fresh):
    sampled = SP(temperature=1.0, seed=5)
    w = fresh()
    r = w.execute(prefill(sampling=sampled, forks=[Fork(1, 2, 1), Fork(1, 3, 2)], mask_seq_ids=[3, 1],
                          masks=mask_bytes([{30}, {10}], VOCAB)))
    assert isinstance(r, StepResult) and r.seq_ids == [1, 2, 3]
    assert r.token_ids[0] == 10 and r.token_ids[2] == 30


# --------------------------------------------------------------------------------------------
# The ZMQ loop: a deferred StepMasks frame


@pytest.fixture
def serving(fresh):
    """The executor loop on a fresh worker in a thread; yields a DEALER to it."""
    import zmq

    from services.executor.service import serve
    from shared import transport

    ctx = zmq.Context()
    addr = f"inproc://grammar-masks-{id(ctx)}"
    sock = transport.router(ctx, addr)
    code: list = []
    thread = threading.Thread(target=lambda: code.append(serve(fresh(), sock)), daemon=True)
    thread.start()
    client = transport.dealer(ctx, addr)
    client.setsockopt(zmq.RCVTIMEO, 20_000)
    try:
        yield client
    finally:
        from shared.messages import Shutdown
        transport.send(client, Shutdown())
        thread.join(timeout=10)
        client.close(linger=0)
        sock.close(linger=0)
        ctx.term()
    assert code == [0]


@pytest.mark.integration
def test_service_receives_deferred_masks_and_fails_on_a_wrong_frame(serving):
    from shared import transport
    client = serving
    transport.send(client, prefill(mask_seq_ids=[1]))
    transport.send(client, StepMasks(step_id=0, masks=mask_bytes([{42}], VOCAB)))
    r = transport.recv(client)
    assert isinstance(r, StepResult) and r.token_ids == [42]

    transport.send(client, StepPlan(step_id=1, run_seq_ids=[1], run_num_tokens=[1], mask_seq_ids=[1]))
    transport.send(client, StepMasks(step_id=7, masks=mask_bytes([{42}], VOCAB)))
    err = transport.recv(client)
    assert isinstance(err, ExecutorError) and err.step_id == 1
    assert "expected the StepMasks of step 1, got those of step 7" in err.message

    # a deferred plan refused by validation: its StepMasks is dropped unanswered, the next plan
    # gets its own reply
    transport.send(client, StepPlan(step_id=2, run_seq_ids=[9], run_num_tokens=[1], mask_seq_ids=[9]))
    transport.send(client, StepMasks(step_id=2, masks=mask_bytes([{42}], VOCAB)))
    err = transport.recv(client)
    assert isinstance(err, ExecutorError) and err.step_id == 2 and "unknown seq 9" in err.message
    transport.send(client, StepPlan(step_id=3, finished=[1]))
    r = transport.recv(client)
    assert isinstance(r, StepResult) and r.step_id == 3


@pytest.mark.integration
def test_deferred_masks_time_out_and_refuse_other_messages():
    import zmq

    from services.executor.service import MasksFrameError, deferred_masks
    from shared import transport
    from shared.messages import Shutdown

    ctx = zmq.Context()
    sock = transport.router(ctx, "inproc://grammar-masks-timeout")
    client = transport.dealer(ctx, "inproc://grammar-masks-timeout")
    try:
        transport.send(client, Shutdown())                 # learn the client's identity
        identity, _ = transport.recv_routed(sock)
        with pytest.raises(MasksFrameError, match="no StepMasks for step 4 within 0.05s"):
            deferred_masks(sock, identity, 4, timeout_s=0.05)()
        transport.send(client, Shutdown())
        with pytest.raises(MasksFrameError, match="expected the StepMasks of step 4, got Shutdown"):
            deferred_masks(sock, identity, 4, timeout_s=5)()
        transport.send(client, StepMasks(step_id=4, masks=b"abcd"))
        assert deferred_masks(sock, identity, 4, timeout_s=5)() == b"abcd"
        transport.send(client, StepMasks(step_id=4, masks=b"abcd"))
        with pytest.raises(MasksFrameError, match="another peer"):
            deferred_masks(sock, b"someone else", 4, timeout_s=5)()
        client.send(b"\x00garbage")
        with pytest.raises(MasksFrameError, match="bad frame"):
            deferred_masks(sock, identity, 4, timeout_s=5)()
    finally:
        client.close(linger=0)
        sock.close(linger=0)
        ctx.term()
