"""The codec: round trips, validation on decode, clear errors, compact plans."""
import msgspec
import pytest

from shared.messages import (
    PROTOCOL_VERSION, AddRequest, Fork, NewSeq, ProtocolError, SamplingParams, StepPlan,
    StepResult, TableUpdate, decode, encode,
)


def test_round_trip_every_field():
    plan = StepPlan(
        step_id=7,
        new=[NewSeq(1, [5, 6, 7], [], [3, 4], 0, 3, SamplingParams(n=2, temperature=0.0, seed=1))],
        run_seq_ids=[2, 3], run_num_tokens=[1, 1],
        table_updates=[TableUpdate(2, 1, [9])], forks=[Fork(1, 4, 1)],
        copies=[(3, 8)], swap_out=[(5, 0)], swap_in=[(1, 6)], finished=[9], preempted=[10],
    )
    assert decode(encode(plan)) == plan


def test_decode_plan_of_256_running_sequences_is_small():
    plan = StepPlan(step_id=1, run_seq_ids=list(range(1000, 1256)), run_num_tokens=[1] * 256,
                    table_updates=[TableUpdate(1000 + i, 40, [2000 + i]) for i in range(16)])
    assert len(encode(plan)) < 4096


@pytest.mark.parametrize("frame, reason", [
    (b"\xc1\x00", "malformed"),
    (msgspec.msgpack.encode({"type": "nope", "version": PROTOCOL_VERSION}), "invalid"),
    (msgspec.msgpack.encode({"type": "plan", "version": PROTOCOL_VERSION + 1, "step_id": 1}), "version"),
    (msgspec.msgpack.encode({"type": "add", "version": PROTOCOL_VERSION, "request_id": "a",
                             "prompt_token_ids": [-1]}), "invalid"),
    (msgspec.msgpack.encode([1, 2, 3]), "invalid"),
    (b"\x81\xa4type\xa2\xe1d", "malformed"),          # a tag that is not UTF-8 (found by fuzzing)
])
def test_bad_frames_raise_protocol_error(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(frame)


def test_sampling_ranges_are_validated_on_decode():
    bad = encode(AddRequest(request_id="r", prompt_token_ids=[1], sampling=SamplingParams(top_p=0.0)))
    with pytest.raises(ProtocolError, match="top_p"):
        decode(bad)


def test_result_round_trip():
    res = StepResult(step_id=3, seq_ids=[1, 2], token_ids=[10, 11])
    assert decode(encode(res)) == res
