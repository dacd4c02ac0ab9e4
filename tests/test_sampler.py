"""Tests of services/executor/sampler.py: behaviour on crafted logits, against per-row references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.executor.sampler import (Sampler, SamplingMetadata, apply_penalties, process_logits,
                                       row_key, seeded_exponentials)
from shared.messages import SamplingParams as SP
from shared.messages import TokenLogprobs

sampler = Sampler()


def run(logits: torch.Tensor, rows):
    """rows: list of (params, prompt, output, sample_index) or bare params."""
    rows = [r if isinstance(r, tuple) else (r, [], [], 0) for r in rows]
    return sampler(logits, SamplingMetadata.build(rows, "cpu"))


def distinct_logits(B: int, V: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


# --------------------------------------------------------------------------------------------
# Per-row references (float64 numpy, straightforward loops)


def ref_penalties(logits_row: np.ndarray, p: SP, prompt: list[int], output: list[int]) -> np.ndarray:
    x = logits_row.astype(np.float64).copy()
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= output.count(t) * p.frequency_penalty + p.presence_penalty
    return x


def ref_support(logits_row: np.ndarray, p: SP) -> tuple[np.ndarray, float]:
    """Tokens that may be sampled (after temperature, min-p, top-k, top-p, in that order) and the
    smallest relative distance of any min-p / top-p quantity to its threshold."""
    t = 1.0 if p.temperature < 1e-5 else np.float32(p.temperature)
    x = logits_row.astype(np.float64) / t
    V = len(x)
    keep = np.ones(V, dtype=bool)
    margin = math.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.min_p > 0:
        thr = np.float32(p.min_p) * probs.max()
        keep &= probs >= thr
        margin = min(margin, float(np.min(np.abs(probs - thr) / probs.max())))
    order = np.argsort(-x, kind="stable")
    if 0 < p.top_k < V:
        keep[order[p.top_k:]] = False
    if p.top_p < 1.0:
        pr = np.where(keep, probs, 0.0)
        pr /= pr.sum()
        ps = pr[order]
        before = np.cumsum(ps) - ps
        cut = before >= np.float32(p.top_p)
        keep[order[cut]] = False
        live = ps > 0
        margin = min(margin, float(np.min(np.abs(before[live] - np.float32(p.top_p)))))
    return keep, margin


params_strategy = st.builds(
    SP,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    top_k=st.sampled_from([-1, 0, 1, 2, 5, 17, 100]),
    top_p=st.sampled_from([1.0, 0.95, 0.6, 0.2, 0.01]),
    min_p=st.sampled_from([0.0, 0.0, 0.05, 0.3]),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)


# --------------------------------------------------------------------------------------------
# Greedy


def test_fast_greedy_is_argmax_and_no_logprobs():
    logits = distinct_logits(7, 50, 0)
    rows = [(SP(temperature=0.0), [1, 2], [3], 0)] * 7
    meta = SamplingMetadata.build(rows, "cpu")
    assert meta.fast_greedy
    out = sampler(logits, meta)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None


@pytest.mark.parametrize("penalised", [False, True])
def test_greedy_ties_take_the_first_index_like_argmax(penalised):
    logits = torch.zeros(3, 49152)
    logits[0, [7, 9000, 40000]] = 5.0
    logits[1, [48000, 3]] = 2.0
    logits[2] = 1.0                                     # all tied: token 0
    params = SP(temperature=0.0, repetition_penalty=1.0 if not penalised else 1.2)
    out = sampler(logits, SamplingMetadata.build([(params, [100], [], 0)] * 3, "cpu"))
    assert out.token_ids.tolist() == [7, 3, 0] == logits.argmax(-1).tolist()


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = distinct_logits(6, 40, 1)
    rows = [SP(temperature=0.0), SP(temperature=1.5, seed=3), SP(temperature=0.0, top_k=3),
            SP(temperature=1.0), SP(temperature=1e-6), SP(temperature=0.0, logprobs=2)]
    meta = SamplingMetadata.build([(r, [], [], 0) for r in rows], "cpu")
    assert not meta.fast_greedy
    out = sampler(logits, meta)
    for i in (0, 2, 4, 5):                                   # 1e-6 < 1e-5 counts as greedy
        assert out.token_ids[i].item() == logits[i].argmax().item()


def test_temperature_to_zero_limit_is_argmax():
    # Logit gaps of >= 0.5 with T = 1e-3 leave the runner-up with probability < e^-500.
    V = 30
    logits = torch.randperm(V, generator=torch.Generator().manual_seed(2)).float() * 0.5
    logits = logits.expand(200, V).contiguous()
    out = run(logits, [SP(temperature=1e-3, seed=s) for s in range(200)])
    assert (out.token_ids == logits[0].argmax()).all()


def test_empty_batch():
    out = run(torch.zeros(0, 10), [])
    assert out.token_ids.shape == (0,) and out.logprobs is None


def test_input_logits_not_modified():
    logits = distinct_logits(4, 20, 3)
    before = logits.clone()
    run(logits, [(SP(top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5,
                     frequency_penalty=0.5, logprobs=3), [1, 2], [2, 5], 0)] * 4)
    run(logits, [SP(top_k=2)] * 4)
    assert torch.equal(logits, before)


# --------------------------------------------------------------------------------------------
# Truncation: min-p, top-k, top-p


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.lists(params_strategy, min_size=1, max_size=6), V=st.integers(2, 64),
       logit_seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.5, 2.0, 6.0]))
def test_truncation_support_matches_reference_and_samples_stay_inside(params, V, logit_seed, scale):
    B = len(params)
    logits = distinct_logits(B, V, logit_seed, scale)
    meta = SamplingMetadata.build([(p, [], [], 0) for p in params], "cpu")
    processed = process_logits(logits, meta)
    supports = []
    for i, p in enumerate(params):
        keep, margin = ref_support(logits[i].numpy(), p)
        assume(margin > 1e-4)                                # skip float-boundary cases
        supports.append(keep)
    for i in range(B):
        assert np.array_equal(torch.isfinite(processed[i]).numpy(), supports[i]), params[i]
    for _ in range(3):
        tok = sampler(logits, meta).token_ids
        for i in range(B):
            assert supports[i][tok[i].item()], (params[i], tok[i].item())


def test_top_k_only_path_keeps_exactly_k():
    # No row uses top-p, so the partial (torch.topk) path runs; rows mix k values and "off".
    V = 100
    logits = distinct_logits(5, V, 4)
    ks = [1, 7, -1, 0, 100]
    meta = SamplingMetadata.build([(SP(top_k=k), [], [], 0) for k in ks], "cpu")
    assert meta.any_top_k and not meta.any_top_p
    processed = process_logits(logits, meta)
    for i, k in enumerate(ks):
        kept = torch.isfinite(processed[i])
        expect = V if k <= 0 else min(k, V)
        assert kept.sum().item() == expect
        assert set(kept.nonzero().flatten().tolist()) == set(logits[i].topk(expect).indices.tolist())


def test_no_truncation_masks_nothing():
    logits = distinct_logits(3, 500, 5, scale=10.0)          # long tails of tiny probabilities
    meta = SamplingMetadata.build([(SP(top_p=1.0, top_k=-1, min_p=0.0), [], [], 0),
                                   (SP(top_p=0.5), [], [], 0), (SP(top_k=0), [], [], 0)], "cpu")
    processed = process_logits(logits, meta)
    assert torch.isfinite(processed[0]).all() and torch.isfinite(processed[2]).all()
    assert torch.allclose(processed[0], logits[0])


# --------------------------------------------------------------------------------------------
# Seeds


def _python_exponential(key: int, v: int) -> float:
    m = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    z = mix((key + (v + 1) * 0x9E3779B97F4A7C15) & m)
    return -math.log(((z >> 41) + 0.5) * 2.0 ** -23)


def test_seeded_noise_matches_python_splitmix64():
    keys = [row_key(0, 0, 0), row_key(2**64 - 1, 3, 17), row_key(-5, 0, 1), 0, -1]
    e = seeded_exponentials(torch.tensor(keys, dtype=torch.int64), 1000)
    assert e.shape == (5, 1000) and e.dtype == torch.float32
    for r, k in enumerate(keys):
        for v in (0, 1, 2, 511, 999):
            assert e[r, v].item() == pytest.approx(_python_exponential(k, v), rel=1e-6, abs=1e-7)
    assert (e > 0).all() and torch.isfinite(e).all()
    # Sanity: Exp(1) has mean 1 and P(E > 1) = 1/e.
    assert abs(e.mean().item() - 1.0) < 0.05
    assert abs((e > 1).float().mean().item() - math.exp(-1)) < 0.02


def test_seeded_reproducible_across_runs_compositions_and_order():
    V = 1000
    g = torch.Generator().manual_seed(6)
    target_logits = torch.randn(V, generator=g)
    target = (SP(seed=1234, top_k=200, top_p=0.9, temperature=0.8), [5, 6], [7, 8, 9], 1)

    alone = run(target_logits[None], [target]).token_ids.item()
    assert run(target_logits[None], [target]).token_ids.item() == alone

    # Embedded among 9 other rows (seeded, unseeded, greedy, penalised) at every position.
    others = [(SP(), [], [], 0), (SP(seed=1), [], [], 0), (SP(temperature=0.0), [], [], 0),
              (SP(seed=1234, top_k=5), [], [2], 0), (SP(repetition_penalty=1.5), [1, 2], [3], 0),
              (SP(min_p=0.2, seed=9), [], [], 0), (SP(logprobs=3), [], [], 0),
              (SP(top_p=0.3), [], [], 0), (SP(frequency_penalty=1.0, seed=4), [], [1, 1], 2)]
    for pos in range(10):
        rows = others[:pos] + [target] + others[pos:]
        logits = torch.randn(10, V, generator=g)
        logits[pos] = target_logits
        assert run(logits, rows).token_ids[pos].item() == alone
    # Reversed order of a batch of all-seeded rows gives the reversed tokens.
    rows = [(SP(seed=s), [], [], 0) for s in range(8)]
    logits = torch.randn(8, V, generator=g)
    fwd = run(logits, rows).token_ids
    bwd = run(logits.flip(0), rows[::-1]).token_ids
    assert torch.equal(fwd, bwd.flip(0))


def _stream(seed: int, sample_index: int, steps: int = 20, V: int = 1000) -> list[int]:
    """Tokens of a seeded sequence over uniform logits; the step position is len(output)."""
    out: list[int] = []
    for _ in range(steps):
        out.append(run(torch.zeros(1, V), [(SP(seed=seed), [1], list(out), sample_index)])
                   .token_ids.item())
    return out


def test_seeded_streams_per_sample_index_and_step():
    a0, a0_again, a1, b0 = _stream(7, 0), _stream(7, 0), _stream(7, 1), _stream(8, 0)
    assert a0 == a0_again
    assert a0 != a1 and a0 != b0 and a1 != b0
    assert len(set(a0)) > 15                     # successive steps draw fresh noise


def test_unseeded_rows_vary():
    logits = torch.zeros(8, 1000)
    rows = [SP()] * 8
    draws = {tuple(run(logits, rows).token_ids.tolist()) for _ in range(3)}
    assert len(draws) == 3
    assert len(set(run(logits, rows).token_ids.tolist())) > 1


@pytest.mark.parametrize("seed", [None, 5])
def test_sampled_frequencies_follow_the_probabilities(seed):
    """Exponential races (argmax p / E) pick token i with probability p_i: 4000 rows of one
    distribution, each token's count within 5 standard deviations of its expectation."""
    torch.manual_seed(0)
    probs = torch.tensor([0.55, 0.3, 0.1, 0.05])
    n = 4000
    rows = [(SP(seed=seed), [], [], i) for i in range(n)]
    got = torch.bincount(run(probs.log().expand(n, -1).contiguous(), rows).token_ids, minlength=4)
    sd = (n * probs * (1 - probs)).sqrt()
    assert ((got - n * probs).abs() < 5 * sd).all(), got.tolist()


def test_min_p_one_keeps_only_the_most_likely_token():
    logits = distinct_logits(6, 50, seed=3)
    got = run(logits, [SP(min_p=1.0, temperature=2.0)] * 6).token_ids
    assert got.tolist() == logits.argmax(-1).tolist()


# --------------------------------------------------------------------------------------------
# Penalties


def test_penalties_match_per_row_reference():
    rng = np.random.default_rng(0)
    V, B = 40, 8
    logits = torch.tensor(rng.normal(0, 2, (B, V)), dtype=torch.float32)
    rows = []
    for i in range(B):
        p = SP(repetition_penalty=[1.0, 1.3, 0.7, 2.0][i % 4],
               presence_penalty=[0.0, 0.5, -1.0, 2.0][(i // 2) % 4],
               frequency_penalty=[0.0, 0.25, 1.0, -0.5][(i + 1) % 4])
        prompt = rng.integers(0, V, rng.integers(0, 10)).tolist()
        output = rng.integers(0, V, rng.integers(0, 12)).tolist()     # with repeats
        rows.append((p, prompt, output, 0))
    meta = SamplingMetadata.build(rows, "cpu")
    got = apply_penalties(logits, meta)
    for i, (p, prompt, output, _) in enumerate(rows):
        ref = ref_penalties(logits[i].numpy(), p, prompt, output)
        np.testing.assert_allclose(got[i].numpy(), ref, rtol=1e-5, atol=1e-5)
    # Greedy end to end: the argmax of the reference-penalised logits.
    greedy_rows = [(SP(temperature=0.0, repetition_penalty=p.repetition_penalty,
                       presence_penalty=p.presence_penalty,
                       frequency_penalty=p.frequency_penalty), pr, o, 0) for p, pr, o, _ in rows]
    tok = run(logits, greedy_rows).token_ids
    for i, (p, prompt, output, _) in enumerate(rows):
        assert tok[i].item() == int(np.argmax(ref_penalties(logits[i].numpy(), p, prompt, output)))


def test_penalty_semantics_on_crafted_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    # Repetition over prompt + output: positive divided, negative multiplied, others untouched.
    got = apply_penalties(logits, SamplingMetadata.build(
        [(SP(repetition_penalty=2.0), [0], [1, 1], 0)], "cpu"))
    assert got.tolist() == [[1.0, -4.0, 1.0, 0.5, 3.0]]
    # Presence / frequency over output only (the prompt token 4 is not penalised).
    got = apply_penalties(logits, SamplingMetadata.build(
        [(SP(presence_penalty=0.5, frequency_penalty=0.25), [4], [2, 2, 2, 3], 0)], "cpu"))
    assert got.tolist() == [[2.0, -2.0, 1.0 - 0.75 - 0.5, 0.5 - 0.25 - 0.5, 3.0]]
    # Rows without penalties are not touched when another row has them.
    meta = SamplingMetadata.build([(SP(), [0, 1], [2], 0),
                                   (SP(frequency_penalty=1.0), [], [4], 0)], "cpu")
    got = apply_penalties(logits.expand(2, 5), meta)
    assert got[0].tolist() == logits[0].tolist()
    assert got[1].tolist() == [2.0, -2.0, 1.0, 0.5, 2.0]
    assert meta.prompt_tokens.numel() == 0                   # no repetition penalty anywhere


def test_penalties_steer_greedy_away_from_repeats():
    logits = torch.tensor([[5.0, 4.9, 0.0]])
    assert run(logits, [(SP(temperature=0.0), [], [0, 0], 0)]).token_ids.item() == 0
    assert run(logits, [(SP(temperature=0.0, frequency_penalty=0.1), [], [0, 0], 0)]
               ).token_ids.item() == 1


# --------------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_from_raw_distribution_sorted_topk():
    V = 50
    logits = distinct_logits(5, V, 7)
    rows = [(SP(logprobs=5, seed=1, top_k=3), [], [], 0),
            (SP(), [], [], 0),
            (SP(logprobs=0, temperature=0.0), [], [], 0),
            (SP(logprobs=20, repetition_penalty=1.8, presence_penalty=1.0), [1, 2], [3], 0),
            (SP(logprobs=1, temperature=0.5, top_p=0.5), [], [], 0)]
    out = run(logits, rows)
    raw = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[1] is None
    for i, k in ((0, 5), (2, 0), (3, 20), (4, 1)):
        lp = out.logprobs[i]
        assert isinstance(lp, TokenLogprobs)
        tok = out.token_ids[i].item()
        assert lp.logprob == pytest.approx(raw[i, tok].item(), abs=1e-5)
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == k
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.top_token_ids == raw[i].topk(k).indices.tolist()
        for t, v in zip(lp.top_token_ids, lp.top_logprobs):
            assert v == pytest.approx(raw[i, t].item(), abs=1e-5)


def test_logprobs_none_when_nobody_asks():
    out = run(distinct_logits(3, 20, 8), [SP(), SP(seed=2, top_k=4), SP(repetition_penalty=1.2)])
    assert out.logprobs is None


# --------------------------------------------------------------------------------------------
# Distribution


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    return float(((counts - n * probs) ** 2 / (n * probs)).sum())


def test_seeded_sampling_matches_softmax():
    # 6000 seeds, 6 tokens: chi-square with 5 dof; 99.99 % quantile is ~25.7, bound is 40.
    logits_row = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5])
    N = 6000
    out = run(logits_row.expand(N, 6).contiguous(), [SP(seed=s, temperature=0.9) for s in range(N)])
    counts = np.bincount(out.token_ids.numpy(), minlength=6)
    probs = torch.softmax(logits_row / np.float32(0.9), -1).double().numpy()
    assert _chi_square(counts, probs) < 40


def test_seeded_sampling_matches_truncated_softmax():
    # top_k=4 drops tokens 2 and 5; top_p=0.8 on the renormalised rest drops token 1.
    logits_row = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5])
    N = 6000
    out = run(logits_row.expand(N, 6).contiguous(),
              [SP(seed=s, top_k=4, top_p=0.8) for s in range(N)])
    counts = np.bincount(out.token_ids.numpy(), minlength=6)
    assert counts[[1, 2, 5]].sum() == 0
    kept = [0, 3, 4]
    probs = torch.softmax(logits_row[kept], -1).double().numpy()
    assert _chi_square(counts[kept], probs) < 40             # 2 dof; 99.99 % quantile ~18.4


# --------------------------------------------------------------------------------------------
# Realistic vocabulary


def test_large_vocab_mixed_batch():
    V, B = 49152, 16
    logits = distinct_logits(B, V, 9)
    kinds = [SP(), SP(temperature=0.0), SP(seed=5, top_p=0.9), SP(top_k=50, min_p=0.05),
             SP(seed=6, repetition_penalty=1.1, frequency_penalty=0.3, logprobs=5),
             SP(seed=7, temperature=0.7, top_k=40, top_p=0.95), SP(presence_penalty=1.0),
             SP(min_p=0.1, seed=8)]
    rows = [(kinds[i % len(kinds)], list(range(i, i + 200)), list(range(i, i + 30)), 0)
            for i in range(B)]
    meta = SamplingMetadata.build(rows, "cpu")
    a = sampler(logits, meta)
    b = sampler(logits, meta)
    assert a.token_ids.shape == (B,) and ((a.token_ids >= 0) & (a.token_ids < V)).all()
    seeded = [i for i, r in enumerate(rows) if r[0].seed is not None]
    assert torch.equal(a.token_ids[seeded], b.token_ids[seeded])
    assert [lp is not None for lp in a.logprobs] == [r[0].logprobs is not None for r in rows]
    # Top-k only path on the same vocabulary.
    out = run(logits, [SP(top_k=10, seed=i) for i in range(B)])
    for i in range(B):
        assert out.token_ids[i].item() in set(logits[i].topk(10).indices.tolist())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_noise_and_tokens_same_on_cuda_as_cpu():
    keys = torch.tensor([row_key(s, s % 3, s % 5) for s in range(16)], dtype=torch.int64)
    assert torch.equal(seeded_exponentials(keys, 4096),
                       seeded_exponentials(keys.cuda(), 4096).cpu())
    logits = torch.zeros(16, 4096)                  # uniform: the token is decided by the noise
    rows = [(SP(seed=s), [], [], s % 3) for s in range(16)]
    cpu = sampler(logits, SamplingMetadata.build(rows, "cpu")).token_ids
    gpu = sampler(logits.cuda(), SamplingMetadata.build(rows, "cuda")).token_ids.cpu()
    assert torch.equal(cpu, gpu)


def test_logit_bias_adds_to_the_named_tokens_of_its_row_only():
    logits = distinct_logits(3, 50, seed=7)
    top = logits.argmax(-1)
    forced, banned = 11, int(top[1])
    rows = [SP(temperature=0.0, logit_bias={forced: 100.0}),            # +100 wins the argmax
            SP(temperature=0.0, logit_bias={banned: -100.0}),           # -100 drops the argmax
            SP(temperature=0.0)]                                         # untouched
    out = run(logits, rows).token_ids.tolist()
    assert out[0] == forced
    assert out[1] != banned and out[1] == int(logits[1].clone().index_fill_(0, top[1], -math.inf).argmax())
    assert out[2] == int(top[2])
    meta = SamplingMetadata.build([(r, [], [], 0) for r in rows], "cpu")
    assert not meta.fast_greedy and meta.bias_rows.tolist() == [0, 1]


def test_logit_bias_bans_a_token_when_sampling():
    logits = torch.zeros(4, 8)                                           # uniform
    rows = [SP(temperature=1.0, seed=s, logit_bias={t: -100.0 for t in range(7)}) for s in range(4)]
    assert run(logits, rows).token_ids.tolist() == [7, 7, 7, 7]
