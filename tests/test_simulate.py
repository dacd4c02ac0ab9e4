"""The simulator: small runs of each workload through the real Scheduler and the contiguous baseline."""
import json
import os
import subprocess
import sys

import pytest

from services.scheduler.sim.simulate import BEAM_WIDTH, make_workload, possible_prefix_hits, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("kv_waste_pct", "peak_concurrency", "admission_failures_with_free_memory", "preemptions",
          "prefix_hit_rate", "prefix_hit_rate_first_admission", "prefix_hit_rate_of_possible", "tokens_per_step",
          "steps")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return simulate("mixed", num_requests=24, num_blocks=512, block_size=16, max_model_len=4096, seed=1,
                    out_dir=str(out)), out


def test_summary_fields_are_present_and_sane(mixed):
    s, _ = mixed
    for side in ("paged", "contiguous", "contiguous_max_tokens"):
        for f in FIELDS:
            assert f in s[side], (side, f)
        assert 0 <= s[side]["kv_waste_pct"] < 100 and s[side]["steps"] > 0 and s[side]["tokens_per_step"] > 0
    paged = s["paged"]
    assert paged["finished_sequences"] == 24 and not paged["rejected"]
    assert paged["kv_waste_pct"] < 4                          # only last blocks are partly empty
    assert s["contiguous"]["kv_waste_pct"] > 50               # max_model_len reserved per sequence
    assert paged["prefix_hit_rate_of_possible"] is None       # random prompts share nothing
    assert paged["prefix_hit_rate_first_admission"] == 0.0    # (prefix_hit_rate also counts re-admissions)


def test_paged_beats_contiguous_on_the_same_memory(mixed):
    s, _ = mixed
    assert s["paged"]["peak_concurrency"] >= 3 * s["contiguous"]["peak_concurrency"]
    assert s["paged"]["steps"] < s["contiguous"]["steps"]     # same work drains sooner
    assert s["contiguous"]["admission_failures"] > 0
    # variable-size reservations fragment: failures although enough slots were free in total
    assert s["contiguous_max_tokens"]["admission_failures_with_free_memory"] > 0


def test_all_blocks_are_free_at_the_end(mixed):
    s, _ = mixed
    assert s["paged"]["free_blocks_at_end"] == s["paged"]["num_blocks"] == 512


def test_plot_and_json_are_written(mixed):
    s, out = mixed
    png = out / "simulate-mixed.png"
    assert s["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "simulate-mixed.json").read_text())["paged"] == s["paged"]


def _brute_force_hits(requests, block_size: int) -> int:
    """Prompt tokens a perfect prefix cache serves at first admission, counted the slow way: for
    each request (arrival order), the longest prefix shared with any earlier prompt, in whole
    blocks, at most ``len(prompt) - 1`` tokens (one token is always computed)."""
    total = 0
    ordered = sorted(requests, key=lambda r: r.arrival)
    for i, r in enumerate(ordered):
        best = 0
        for earlier in ordered[:i]:
            common = 0
            while common < min(len(r.prompt), len(earlier.prompt)) and r.prompt[common] == earlier.prompt[common]:
                common += 1
            best = max(best, common)
        total += min(best, len(r.prompt) - 1) // block_size * block_size
    return total


def test_shared_prefix_hits_equal_a_brute_force_count():
    """With room for every block (nothing evicted, nothing preempted) the simulator's first-admission
    prefix hits are exactly what a perfect cache serves, counted independently."""
    args = dict(num_requests=40, max_model_len=4096, seed=1, arrival_rate=0.5)
    s = simulate("shared-prefix", num_blocks=4096, block_size=16, strict=True, **args)   # strict: KV checked
    p = s["paged"]
    expected = _brute_force_hits(make_workload("shared-prefix", args["num_requests"], args["max_model_len"],
                                               seed=args["seed"], arrival_rate=args["arrival_rate"]), 16)
    assert expected > 0
    assert p["prefix_hit_tokens"] == expected == p["prefix_possible_tokens"]
    assert p["preemptions"] == 0 and p["free_blocks_at_end"] == 4096


def test_shared_prefix_hits_under_memory_pressure_stay_within_what_sharing_allows():
    s = simulate("shared-prefix", num_requests=40, num_blocks=512, block_size=16, max_model_len=4096, seed=1,
                 arrival_rate=0.5, strict=True)
    p = s["paged"]
    assert 0 < p["prefix_hit_tokens"] <= p["prefix_possible_tokens"]
    assert p["free_blocks_at_end"] == 512


def test_parallel_sampling_shares_prompt_blocks():
    s = simulate("parallel-sampling", num_requests=10, num_blocks=1024, block_size=16, max_model_len=4096,
                 seed=2, strict=True)
    assert s["paged"]["finished_sequences"] == 40
    assert s["paged"]["peak_concurrency"] > 3 * s["contiguous"]["peak_concurrency"]
    assert s["paged"]["free_blocks_at_end"] == 1024


def test_beam_search_holds_fewer_blocks_shared_than_as_private_copies():
    """Beams forked from one parent share the prompt and their common prefix: fewer blocks than
    if each beam held its own copy, but never fewer than the largest beam's own (at most a
    1 - 1/width saving); the fake executor checks every KV read (strict)."""
    s = simulate("beam-search", num_requests=8, num_blocks=1024, block_size=16, max_model_len=4096, seed=2,
                 strict=True)
    paged, kv = s["paged"], s["paged"]["beam_kv"]
    assert paged["finished_sequences"] == 8 * BEAM_WIDTH and not paged["rejected"]
    assert paged["free_blocks_at_end"] == 1024
    assert 0 < kv["kv_saving_pct"] <= 100 * (1 - 1 / BEAM_WIDTH)
    assert 0 < kv["kv_saving_pct_at_peak"] <= 100 * (1 - 1 / BEAM_WIDTH)
    assert kv["mean_blocks_shared"] < kv["mean_blocks_own_copies"]
    assert kv["peak_blocks_shared"] <= 1024 < kv["peak_blocks_own_copies"] * 2
    pct = 100 * (1 - kv["mean_blocks_shared"] / kv["mean_blocks_own_copies"])
    assert abs(pct - kv["kv_saving_pct"]) < 0.1                # the mean and the sum over steps agree
    assert "beam_kv" not in simulate("parallel-sampling", num_requests=2, num_blocks=256, block_size=16,
                                     max_model_len=4096, seed=2)["paged"]


def test_beam_search_under_memory_pressure_still_finishes_every_beam():
    s = simulate("beam-search", num_requests=6, num_blocks=170, block_size=16, max_model_len=4096, seed=5,
                 strict=True)
    assert s["paged"]["preemptions"] > 0 and not s["paged"]["rejected"]
    assert s["paged"]["finished_sequences"] == 6 * BEAM_WIDTH and s["paged"]["free_blocks_at_end"] == 170
    assert s["paged"]["beam_kv"]["kv_saving_pct"] > 0


def test_workloads_follow_their_definitions():
    mixed = make_workload("mixed", 300, 4096, seed=3)
    assert all(16 <= len(r.prompt) <= 2048 and r.n == 1 and 16 <= r.output_lens[0] <= 1024 for r in mixed)
    shared = make_workload("shared-prefix", 50, 4096, seed=3)
    assert len({tuple(r.prompt[:512]) for r in shared}) <= 10
    assert all(512 + 32 <= len(r.prompt) <= 512 + 128 for r in shared)
    assert all(r.n == 4 for r in make_workload("parallel-sampling", 5, 4096, seed=3))
    beams = make_workload("beam-search", 20, 4096, seed=3)
    assert all(r.beam and r.n == BEAM_WIDTH and 64 <= r.max_tokens <= 512 for r in beams)
    poisson = make_workload("mixed", 50, 4096, seed=3, arrival_rate=0.5)
    assert poisson[-1].arrival > 0 and all(a.arrival <= b.arrival for a, b in zip(poisson, poisson[1:]))
    # 50 requests over 10 system prompts of 32 full blocks: all but the first of each can hit them
    assert possible_prefix_hits(shared, 16) == 16 * 32 * (50 - len({tuple(r.prompt[:512]) for r in shared}))


@pytest.mark.integration   # runs the CLI in a subprocess
def test_cli_prints_json_and_rejects_bad_flags(tmp_path):
    cmd = [sys.executable, "-m", "services.cli", "simulate", "--workload", "mixed", "--num-requests", "6",
           "--num-blocks", "256", "--seed", "0", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["paged"]["finished_sequences"] == 6
    assert (tmp_path / "simulate-mixed.png").exists()
    bad = subprocess.run(cmd[:4] + ["--workload", "nope"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "--workload" in bad.stderr


def test_swap_preemption_keeps_kv_content_intact():
    s = simulate("parallel-sampling", num_requests=12, num_blocks=384, block_size=16, max_model_len=4096, seed=4,
                 preemption_mode="swap", num_host_blocks=256, strict=True)
    assert s["paged"]["swapped_out_blocks"] > 0 and s["paged"]["finished_sequences"] == 48
    assert s["paged"]["free_blocks_at_end"] == 384


# ------------------------------------------------------------------ the strict fake executor

from services.scheduler.sim.fake_executor import FakeExecutor  # noqa: E402
from shared.messages import Fork, NewSeq, SamplingParams, StepPlan, StepResult, TableUpdate  # noqa: E402

PROMPT = [10, 11, 12, 13, 14]       # 5 tokens: two blocks of 4, the second partly filled


def _fake() -> FakeExecutor:
    return FakeExecutor(block_size=4, num_blocks=4, num_host_blocks=4, strict=True)


def _ok(fake: FakeExecutor, plan: StepPlan) -> StepResult:
    result = fake.execute(plan)
    assert isinstance(result, StepResult), result.message
    return result


def _forked_pair(fake: FakeExecutor) -> None:
    """Seq 0 prefills PROMPT into blocks [0, 1] and forks seq 1: both tables are [0, 1]."""
    _ok(fake, StepPlan(step_id=0, new=[NewSeq(0, PROMPT, [], [0, 1], 0, 5, SamplingParams(n=2))],
                       forks=[Fork(0, 1, 1)]))


def test_strict_fake_ignores_the_stale_table_of_a_swapped_out_sequence():
    fake = _fake()
    _forked_pair(fake)
    # seq 1 swapped out: the scheduler dropped its references, so seq 0 writes block 1 in place
    _ok(fake, StepPlan(step_id=1, run_seq_ids=[0], run_num_tokens=[1], swap_out=[(0, 0), (1, 1)]))
    assert fake.seqs[1].swapped and not fake.seqs[0].swapped
    # seq 0 finishes; a new seq reuses blocks 0 and 1 that seq 1's stale table still names
    _ok(fake, StepPlan(step_id=2, new=[NewSeq(2, [20, 21, 22, 23, 24], [], [0, 1], 0, 5, SamplingParams())],
                       finished=[0]))
    # seq 1 comes back into blocks 2, 3; strict re-reads its whole context from the swapped data
    _ok(fake, StepPlan(step_id=3, run_seq_ids=[1, 2], run_num_tokens=[1, 1], swap_in=[(0, 2), (1, 3)],
                       table_updates=[TableUpdate(1, 0, [2, 3])]))
    assert not fake.seqs[1].swapped and fake.seqs[1].computed == 6


def test_strict_fake_tells_identical_forked_twins_apart():
    fake = _fake()
    _forked_pair(fake)
    # seq 1 is swapped out in a step where seq 0 does not run: both tables are [0, 1]
    _ok(fake, StepPlan(step_id=1, swap_out=[(0, 0), (1, 1)]))
    assert sum(s.swapped for s in fake.seqs.values()) == 1      # one table's worth of pairs
    assert fake.tokens_stored() == 5
    _ok(fake, StepPlan(step_id=2, run_seq_ids=[0], run_num_tokens=[1]))
    assert fake.seqs[1].swapped and not fake.seqs[0].swapped   # the mark moved to the real one
    assert fake.tokens_stored() == 6


def test_strict_fake_still_catches_overwritten_context():
    fake = _fake()
    _ok(fake, StepPlan(step_id=0, new=[NewSeq(0, PROMPT, [], [0, 1], 0, 5, SamplingParams())]))
    # a copy into block 0, which seq 0 still names: its next step must notice the wrong KV
    result = fake.execute(StepPlan(step_id=1, run_seq_ids=[0], run_num_tokens=[1], copies=[(2, 0)]))
    assert not isinstance(result, StepResult) and "position 0" in result.message


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_strict_checking_is_proportional_to_the_work(mode):
    # preemption-heavy parallel sampling: strict used to re-read every context every step
    s = simulate("parallel-sampling", num_requests=30, num_blocks=96, block_size=16, max_model_len=4096, seed=0,
                 preemption_mode=mode, num_host_blocks=64 if mode == "swap" else 0, strict=True)["paged"]
    assert s["finished_sequences"] == 120 and s["preemptions"] > 0 and s["free_blocks_at_end"] == 96
    assert s["strict_positions_checked"] <= 3 * s["tokens_computed"]


# ------------------------------------------------------------------ sliding window

def _windowed_fake() -> FakeExecutor:
    # W = 4: a query at p reads keys p-3..p, so block i (positions 4i..4i+3) is dead from p = 4i + 7
    return FakeExecutor(block_size=4, num_blocks=4, strict=True, sliding_window=4)


def test_strict_fake_neither_reads_nor_owns_entries_out_of_the_window():
    fake = _windowed_fake()
    assert fake.ready().sliding_window == 4
    _ok(fake, StepPlan(step_id=0, new=[NewSeq(0, list(range(10, 18)), [], [0, 1], 0, 8, SamplingParams())]))
    assert fake.seqs[0].live_from == 1                 # next query at 8 reads 5..8: block 0 is dead
    # block 0 goes (unannounced) to another sequence, which overwrites it; seq 0 decodes unharmed,
    # and a write into block 0 is no write into a block seq 0 shares
    _ok(fake, StepPlan(step_id=1, new=[NewSeq(1, [20, 21, 22], [], [0], 0, 3, SamplingParams())],
                       run_seq_ids=[0], run_num_tokens=[1], table_updates=[TableUpdate(0, 2, [2])]))
    assert fake.kv[0][:3] == [20, 21, 22] and fake.tokens_stored() == 3 + 5


def test_strict_fake_accepts_placeholder_entries_and_still_reads_the_window():
    fake = _windowed_fake()
    _ok(fake, StepPlan(step_id=0, new=[NewSeq(0, list(range(10, 18)), [], [2, 1], 0, 8, SamplingParams())]))
    # a whole new table (as at swap-in) whose dead entry is the placeholder 0, a block seq 1 owns
    _ok(fake, StepPlan(step_id=1, new=[NewSeq(1, [20, 21, 22], [], [0], 0, 3, SamplingParams())],
                       run_seq_ids=[0], run_num_tokens=[1], table_updates=[TableUpdate(0, 0, [0, 1, 3])]))
    # an in-window entry naming a block without the sequence's tokens is still caught
    result = fake.execute(StepPlan(step_id=2, run_seq_ids=[0], run_num_tokens=[1],
                                   table_updates=[TableUpdate(0, 1, [0, 3])]))
    assert not isinstance(result, StepResult) and "position 4" in result.message


def test_a_long_windowed_generation_holds_a_bounded_number_of_blocks():
    from services.scheduler.sim.simulate import SimRequest, run_paged
    from shared.config import CacheConfig, SchedulerConfig
    req = SimRequest("r0", 0, list(range(3, 43)), [4000], 4000)       # 40 prompt tokens, 4000 out
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=8192).validate()
    cache = CacheConfig(block_size=16, num_blocks=512, sliding_window=64).validate()
    summary, trace = run_paged([req], sched, cache, strict=True)
    assert summary["output_tokens"] == 4000 and summary["free_blocks_at_end"] == 512
    # W = 64 over blocks of 16: ceil(64 / 16) + 1 = 5 blocks while a token is computed
    assert max(trace.used) <= 5 * 16
    unbounded, _ = run_paged([req], sched, CacheConfig(block_size=16, num_blocks=512).validate())
    assert unbounded["peak_memory_slots"] == 16 * -(-4039 // 16)      # without a window: all of it


def test_the_sliding_window_flag_reaches_the_paged_run(capsys):
    import argparse
    from services.scheduler.sim.simulate import add_arguments, run
    p = argparse.ArgumentParser()
    add_arguments(p)
    peaks = {}
    for window in ("0", "32"):
        argv = ["--num-requests", "4", "--num-blocks", "512", "--seed", "3", "--strict", "--sliding-window", window]
        assert run(p.parse_args(argv)) == 0
        paged = json.loads(capsys.readouterr().out)["paged"]
        assert paged["free_blocks_at_end"] == 512
        peaks[window] = paged["peak_memory_slots"]
    assert peaks["32"] < peaks["0"]


@pytest.mark.parametrize("max_num_seqs, num_blocks", [(8, 1024), (4, 170)])
def test_beam_search_keeps_within_max_num_seqs(max_num_seqs, num_blocks):
    """A beam search holds n of the max_num_seqs slots from its first admission (its beams fork
    without admission); with n slots in all and a small pool it still finishes (no deadlock
    between a search's running and preempted beams)."""
    from services.scheduler.sim.fake_executor import FakeExecutor

    rows, execute = [], FakeExecutor.execute

    def counting(self, plan, masks=None):
        rows.append(len(plan.run_seq_ids) + len(plan.new))
        return execute(self, plan, masks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FakeExecutor, "execute", counting)
        s = simulate("beam-search", num_requests=6, num_blocks=num_blocks, block_size=16, max_model_len=4096,
                     seed=5, max_num_seqs=max_num_seqs, strict=True)
    assert max(rows) <= max_num_seqs and s["paged"]["peak_concurrency"] <= max_num_seqs
    assert s["paged"]["finished_sequences"] == 6 * BEAM_WIDTH and s["paged"]["free_blocks_at_end"] == num_blocks
