"""Benchmark tools (services/bench/): datasets by token count, serving metrics, the streaming
client against the gateway on a scripted scheduler, the CLI wiring, compare's report logic and
the memory sweep. No model runs here except the subprocess plumbing of `bench compare`."""
from __future__ import annotations

import asyncio
import json
import os
import socket

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.bench import compare, sweep  # noqa: E402
from services.bench.datasets import (  # noqa: E402
    WordPool, prefix_repetition_dataset, random_dataset, sharegpt_like_dataset,
)
from services.bench.metrics import RequestResult, compute_metrics, format_table  # noqa: E402
from services.bench.serve import LoadShape, benchmark, run_requests  # noqa: E402
from services.cli import main  # noqa: E402
from shared.tokenizer import load_tokenizer  # noqa: E402
from tests.gateway_harness import fake, sched, serve_gateway  # noqa: E402,F401 (fixtures)

MODEL = "bench-test"
API_KEY = "sk-bench"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")


@pytest.fixture(scope="module")
def pool(tokenizer):
    return WordPool(tokenizer)


# ------------------------------------------------------------------------------------ datasets


def test_random_dataset_has_exact_token_lengths_and_is_seeded(pool, tokenizer):
    reqs = random_dataset(pool, 6, input_len=40, output_len=7, seed=3)
    assert [r.prompt_len for r in reqs] == [40] * 6 and [r.output_len for r in reqs] == [7] * 6
    assert all(len(tokenizer.encode(r.prompt, add_special_tokens=False)) == 40 for r in reqs)
    assert random_dataset(pool, 6, 40, 7, seed=3) == reqs
    assert random_dataset(pool, 6, 40, 7, seed=4) != reqs
    spread = random_dataset(pool, 50, input_len=100, output_len=20, range_ratio=0.5, seed=0)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in spread)
    assert len({r.prompt_len for r in spread}) > 10
    assert all(len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len for r in spread[:10])
    with pytest.raises(ValueError, match="range ratio"):
        random_dataset(pool, 2, 10, 10, range_ratio=1.5)


def test_sharegpt_like_lengths_are_long_tailed_and_capped(pool, tokenizer):
    reqs = sharegpt_like_dataset(pool, 400, max_input_len=1024, max_output_len=512, seed=0)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() >= 4 and ins.max() <= 1024 and outs.max() <= 512
    assert ins.mean() > 1.3 * np.median(ins)          # right-skewed: the tail pulls the mean up
    assert np.percentile(ins, 99) > 5 * np.median(ins)
    assert sharegpt_like_dataset(pool, 400, seed=0) == reqs
    assert all(len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len for r in reqs[:20])


def test_prefix_repetition_shares_exact_token_prefixes(pool, tokenizer):
    reqs = prefix_repetition_dataset(pool, 12, num_prefixes=3, prefix_len=40, suffix_len=8, output_len=5, seed=1)
    ids = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in reqs]
    assert all(len(t) == 48 == r.prompt_len for t, r in zip(ids, reqs))
    prefixes = [tuple(t[:40]) for t in ids]
    assert len(set(prefixes)) == 3 and all(prefixes.count(p) == 4 for p in set(prefixes))
    assert len({tuple(t[40:]) for t in ids}) == 12                   # every request has its own suffix
    assert any(prefixes[i] != prefixes[i + 3] for i in range(9))     # shuffled, not round-robin
    assert prefix_repetition_dataset(pool, 12, 3, 40, 8, 5, seed=1) == reqs


# ------------------------------------------------------------------------------------ metrics


def test_metrics_follow_vllm_definitions():
    ok = [RequestResult(True, 10, 11, ttft=0.1 * (i + 1), latency=0.1 * (i + 1) + 1.0, itl=[0.1] * 10)
          for i in range(10)]                                     # TPOT = 1.0 s / 10 = 100 ms each
    one = RequestResult(True, 5, 1, ttft=0.05, latency=0.05)       # 1 token: no TPOT, no ITL
    bad = [RequestResult(False, 5, error="HTTP 429: busy")] * 2
    m = compute_metrics(ok + [one] + bad, duration_s=2.0)
    ttfts_ms = [100.0 * (i + 1) for i in range(10)] + [50.0]
    assert m["completed"] == 11 and m["failed"] == 2 and m["errors"] == {"HTTP 429: busy": 2}
    assert m["total_output_tokens"] == 111 and m["total_input_tokens"] == 105
    assert m["output_throughput"] == pytest.approx(111 / 2.0)
    assert m["request_throughput"] == pytest.approx(11 / 2.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(np.mean(ttfts_ms))
    for p in (50, 90, 99):
        assert m["ttft_ms"][f"p{p}"] == pytest.approx(np.percentile(ttfts_ms, p))
    assert m["tpot_ms"] == pytest.approx({"mean": 100.0, "p50": 100.0, "p90": 100.0, "p99": 100.0})
    assert m["itl_ms"]["mean"] == pytest.approx(100.0)
    assert m["e2el_ms"]["p50"] == pytest.approx(np.percentile([1000 + t for t in ttfts_ms[:10]] + [50.0], 50))
    table = format_table(m, "t")
    assert "Failed requests" in table and "error x2: HTTP 429: busy" in table and "P99 TTFT" in table


def test_metrics_of_an_all_failed_run_are_zeros_not_errors():
    m = compute_metrics([RequestResult(False, error="boom")], 1.0)
    assert m["completed"] == 0 and m["ttft_ms"]["p99"] == 0.0 and m["output_throughput"] == 0.0


# ------------------------------------------------------------------------------------ client vs gateway


@pytest.fixture(scope="module")
def server(fake):
    with serve_gateway(fake, MODEL, max_model_len=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(fake):
    with serve_gateway(fake, MODEL, max_model_len=0, api_key=API_KEY) as srv:
        yield srv


def test_client_streams_and_times_every_request(server, sched, pool, tokenizer):
    sched.token_delay = 0.005
    reqs = random_dataset(pool, 5, input_len=24, output_len=2, seed=0)
    results, duration = asyncio.run(run_requests(server.url, MODEL, reqs, LoadShape(), progress=False))
    assert duration > 0 and len(results) == 5
    for r in results:
        assert r.success and r.error == "" and r.output_tokens == 2 and r.prompt_len == 24
        assert len(r.itl) == 1 and 0 < r.ttft <= r.latency and r.latency - r.ttft >= r.itl[0]
    # what the server received: the prompts tokenize to the lengths the dataset promised
    assert sorted(len(a.prompt_token_ids) for a in sched.requests) == [24] * 5
    assert all(a.sampling.max_tokens == 2 and a.sampling.ignore_eos and a.sampling.temperature == 0.0
               for a in sched.requests)


def test_benchmark_with_poisson_rate_concurrency_cap_and_warmups(server, sched, pool):
    reqs = random_dataset(pool, 6, input_len=16, output_len=3, seed=1)
    report = benchmark(server.url, reqs, pool, LoadShape(request_rate=500.0, max_concurrency=2, seed=0),
                       num_warmups=2, progress=False)
    m = report["metrics"]
    assert report["config"]["model"] == MODEL                 # learnt from GET /v1/models
    assert m["completed"] == 6 and m["failed"] == 0 and m["total_output_tokens"] == 18
    assert len(sched.requests) == 8                           # 2 warm-ups + 6 timed
    assert m["tpot_ms"]["mean"] > 0 and m["e2el_ms"]["p99"] >= m["e2el_ms"]["p50"]


def test_http_errors_are_counted_not_raised(server, sched, pool):
    sched.error = "queue_full"
    reqs = random_dataset(pool, 4, 16, 2, seed=2)
    m = benchmark(server.url, reqs, pool, LoadShape(), model=MODEL, progress=False)["metrics"]
    assert m["completed"] == 0 and m["failed"] == 4
    assert list(m["errors"].items()) == [("HTTP 429: fake queue_full", 4)]
    sched.error = None
    m = benchmark(server.url, reqs, pool, LoadShape(), model="no-such-model", progress=False)["metrics"]
    assert m["failed"] == 4 and next(iter(m["errors"])).startswith("HTTP 404")


def test_unreachable_server_is_counted_as_failures(pool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                 # closed again: nothing listens there
    reqs = random_dataset(pool, 3, 8, 2, seed=0)
    m = benchmark(f"http://127.0.0.1:{port}", reqs, pool, LoadShape(), model=MODEL, progress=False)["metrics"]
    assert m["failed"] == 3 and next(iter(m["errors"])).startswith("ConnectError")


def test_api_key_is_sent(keyed_server, sched, pool):
    reqs = random_dataset(pool, 2, 8, 2, seed=0)
    denied = benchmark(keyed_server.url, reqs, pool, LoadShape(), model=MODEL, progress=False)["metrics"]
    assert denied["failed"] == 2 and next(iter(denied["errors"])).startswith("HTTP 401")
    ok = benchmark(keyed_server.url, reqs, pool, LoadShape(), model=MODEL, api_key=API_KEY, progress=False)
    assert ok["metrics"]["completed"] == 2


def test_bench_serve_cli_prints_table_and_writes_json(server, sched, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--num-prompts", "3", "--random-input-len", "12",
               "--random-output-len", "2", "--max-concurrency", "2", "--no-progress", "--output-json", str(out)])
    assert rc == 0
    assert "Output token throughput (tok/s)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["metrics"]["completed"] == 3 and report["config"]["dataset"] == "random"
    assert main(["bench", "serve", "--base-url", server.url, "--num-prompts", "0", "--no-progress"]) == 2
    assert "--num-prompts must be >= 1" in capsys.readouterr().err


def test_bench_serve_cli_reports_an_unreachable_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1",
                 "--no-progress"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_concurrency_sweep_against_one_server(server, sched, tmp_path, capsys):
    rc = main(["bench", "sweep", "concurrency", "--base-url", server.url, "--concurrency", "1,2",
               "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2", "--num-warmups", "0",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "sweep-concurrency.json").read_text())
    assert [r["max_concurrency"] for r in report["rows"]] == [1, 2]
    assert [r["completed"] for r in report["rows"]] == [2, 4]         # at least two waves per level
    assert (tmp_path / "sweep-concurrency.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | 4 / 0 |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ CLI wiring


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--help"], ["serve", "compare", "sweep"]),
    (["bench", "sweep", "--help"], ["concurrency", "memory", "prefix"]),
    (["bench", "serve", "--help"], ["--request-rate", "--max-concurrency", "--dataset", "--output-json"]),
    (["bench", "compare", "--help"], ["--model", "--dtype", "--device", "--out"]),
])
def test_bench_help_lists_tools(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in expected)


# ------------------------------------------------------------------------------------ compare


def _run(system, tok_per_s, **extra):
    return {"system": system, "tok_per_s": tok_per_s, "seconds": 2048 / tok_per_s, **extra}


def _fake_runs():
    first = dict(runtime="torch x", model="m", dtype="float32", device="cpu")
    return {"pagedserve": [_run("pagedserve", 300.0, **first)],
            "hf-padded": [_run("hf-padded", 200.0)],
            "hf-generate-batch": [{"system": "hf-generate-batch", "error": "exit code 1: boom"}]}


def test_compare_report_table_and_plot(tmp_path):
    opts = compare.CompareOptions(num_prompts=32, max_tokens=64)
    report = compare.make_report(_fake_runs(), opts)
    assert report["ratio_of_pagedserve_to"] == {"hf-padded": {"median": 1.5, "min": 1.5, "max": 1.5},
                                                "hf-generate-batch": None}
    table = compare.format_table(report)
    assert "| pagedserve | 300.0 | 6.83 | — |" in table
    assert "| HF generate (padded batch) | 200.0 | 10.24 | 1.50x |" in table
    assert "failed: exit code 1: boom" in table and "32 prompts x 64 new tokens" in table
    assert "rounds" not in table
    path = tmp_path / "c.png"
    compare.plot(report, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_compare_rounds_give_medians_and_the_range_of_round_ratios():
    runs = {"pagedserve": [_run("pagedserve", t, runtime="r") for t in (300.0, 320.0, 250.0)],
            "hf-padded": [_run("hf-padded", t) for t in (200.0, 160.0, 250.0)]}
    report = compare.make_report(runs, compare.CompareOptions())
    assert report["rounds"] == 3
    assert report["systems"]["pagedserve"]["tok_per_s"] == 300.0
    assert report["systems"]["hf-padded"]["runs_tok_per_s"] == [200.0, 160.0, 250.0]
    assert report["ratio_of_pagedserve_to"]["hf-padded"] == {"median": 1.5, "min": 1.0, "max": 2.0}
    table = compare.format_table(report)
    assert "median of 3 rounds" in table
    assert "| pagedserve | 300.0 (250–320) |" in table and "| 1.50x (1.00–2.00) |" in table
    runs["hf-padded"][1] = {"system": "hf-padded", "error": "exit code 1: oom"}
    report = compare.make_report(runs, compare.CompareOptions())
    assert report["systems"]["hf-padded"]["error"] == "exit code 1: oom"
    assert report["ratio_of_pagedserve_to"]["hf-padded"] is None


def test_compare_records_a_failing_system_instead_of_crashing():
    report = compare.run_compare(["pagedserve"], compare.CompareOptions(model="random:no-such-preset"), quiet=True)
    err = report["systems"]["pagedserve"]["error"]
    assert err.startswith("exit code 1") and "no-such-preset" in err
    assert report["ratio_of_pagedserve_to"] == {}


@pytest.mark.parametrize("flag", ["--repeat", "--num-prompts", "--max-tokens"])
def test_compare_cli_rejects_counts_below_one(flag, capsys):
    assert main(["bench", "compare", flag, "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_model_config_to_hf_round_trips():
    from services.executor.model import PRESETS, ModelConfig

    for name in ("tiny", "smollm2-135m", "llama-1b"):
        assert ModelConfig.from_hf(PRESETS[name].to_hf()) == PRESETS[name]


# ------------------------------------------------------------------------------------ sweeps


def test_memory_sweep_paged_serves_more_than_contiguous(tmp_path, capsys):
    rc = main(["bench", "sweep", "memory", "--num-blocks", "128,512", "--num-requests", "40",
               "--max-model-len", "1024", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "sweep-memory.json").read_text())
    small, big = report["rows"]
    assert small["kv_tokens"] == 128 * 16 and small["contiguous_max_model_len"] == 2   # 2048 slots / 1024
    assert big["paged"] >= small["paged"] and all(r["paged"] > r["contiguous_max_model_len"] for r in report["rows"])
    assert (tmp_path / "sweep-memory.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 128 | 2048 |" in capsys.readouterr().out


def test_only_the_http_tools_need_the_http_client(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_httpx(name, *a, **k):
        if name == "httpx":
            raise ImportError("no httpx here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_httpx)
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 2
    assert "HTTP client is missing" in capsys.readouterr().err
    assert main(["bench", "sweep", "memory", "--num-blocks", "64", "--num-requests", "4",
                 "--max-model-len", "256"]) == 0


def test_prefix_ratios():
    def run(mean, p50, ok=1):
        return {"ttft_ms": {"mean": mean, "p50": p50}, "completed": ok}
    assert sweep.prefix_ratios({"on": run(100.0, 50.0), "off": run(600.0, 400.0)}) == {
        "ttft_mean_ratio_off_to_on": 6.0, "ttft_p50_ratio_off_to_on": 8.0}
    assert sweep.prefix_ratios({"on": run(0.0, 0.0, 0), "off": run(600.0, 400.0)})["ttft_mean_ratio_off_to_on"] is None
