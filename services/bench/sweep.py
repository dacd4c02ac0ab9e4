"""`pagedserve bench sweep concurrency|memory|prefix`: the sweeps behind the benchmark figures.

  concurrency  output throughput and latencies vs max concurrency (1, 4, 16, 64 by default), by
               running the `bench serve` client against one running server, one level after another
  memory       most sequences served at once vs KV memory, paged vs contiguous, from the scheduler
               simulator (`pagedserve simulate`'s ``simulate()``: the real Scheduler on a fake
               executor, and the contiguous baseline on the same token slots)
  prefix       time to first token with prefix caching on vs off: starts `pagedserve serve` on a free
               port twice (``--enable-prefix-caching`` / ``--no-enable-prefix-caching``), one after
               the other, runs the prefix-repetition dataset against each and reports the ratio
  routing      data parallelism on the prefix-repetition dataset: one engine, then two behind the
               gateway with prefix-affinity routing, then two with round-robin (three servers in
               turn); prefix-cache hit rate, requests per engine, TTFT and throughput of each
Each writes a table on stdout and, with ``--out DIR``, sweep-<mode>.json and sweep-<mode>.png.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile

from .datasets import add_dataset_arguments, build_dataset
from .serve import LoadShape, add_client_arguments, benchmark, check_load_args, load_pool

# KV bytes per token of the default model (SmolLM2-135M, float32): 2 (K, V) x 30 layers x 3 KV heads x 64 x 4
SMOLLM2_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _save(out_dir: str, mode: str, report: dict, plot_fn) -> None:
    os.makedirs(out_dir, exist_ok=True)
    report["plot"] = os.path.join(out_dir, f"sweep-{mode}.png")
    plot_fn(report, report["plot"])
    with open(os.path.join(out_dir, f"sweep-{mode}.json"), "w") as f:
        json.dump(report, f, indent=2)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------ concurrency


def concurrency_sweep(args: argparse.Namespace) -> dict:
    pool = load_pool(args.tokenizer)
    rows = []
    for level in args.concurrency:
        n = max(args.num_prompts, 2 * level)         # at least two waves at every level
        requests = build_dataset(argparse.Namespace(**{**vars(args), "num_prompts": n}), pool)
        print(f"max concurrency {level}: {n} requests", file=sys.stderr, flush=True)
        report = benchmark(args.base_url, requests, pool, LoadShape(math.inf, level, args.seed), model=args.model,
                           api_key=args.api_key, ignore_eos=args.ignore_eos, num_warmups=args.num_warmups,
                           endpoint=args.endpoint, timeout=args.timeout, progress=not args.no_progress)
        rows.append({"max_concurrency": level, **report["metrics"]})
    return {"mode": "concurrency", "base_url": args.base_url, "dataset": args.dataset, "rows": rows}


def concurrency_table(report: dict) -> str:
    lines = ["| max concurrency | requests ok / failed | req/s | output tok/s | TTFT mean ms | TTFT p50 ms "
             "| TPOT mean ms | ITL p50 ms | E2EL mean ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['max_concurrency']} | {r['completed']} / {r['failed']} | {r['request_throughput']:.2f} "
                     f"| {r['output_throughput']:.1f} | {r['ttft_ms']['mean']:.0f} | {r['ttft_ms']['p50']:.0f} "
                     f"| {r['tpot_ms']['mean']:.1f} | {r['itl_ms']['p50']:.1f} | {r['e2el_ms']['mean']:.0f} |")
    return "\n".join(lines)


def concurrency_plot(report: dict, path: str) -> None:
    plt = _pyplot()
    levels = [r["max_concurrency"] for r in report["rows"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(levels, [r["output_throughput"] for r in report["rows"]], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(v) for v in levels])
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens / s", color="tab:blue")
    right = ax.twinx()
    right.plot(levels, [r["tpot_ms"]["mean"] for r in report["rows"]], "s--", color="tab:red")
    right.set_ylabel("mean TPOT (ms)", color="tab:red")
    ax.set_title(f"throughput vs concurrency ({report['dataset']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ memory


def memory_sweep(args: argparse.Namespace) -> dict:
    from services.scheduler.sim.simulate import simulate

    rows = []
    for num_blocks in args.num_blocks:
        s = simulate(args.workload, args.num_requests, num_blocks, args.block_size, args.max_model_len, args.seed,
                     max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        slots = num_blocks * args.block_size
        rows.append({"num_blocks": num_blocks, "kv_tokens": slots,
                     "kv_mib": slots * args.kv_bytes_per_token / 2**20,
                     "paged": s["paged"]["peak_concurrency"],
                     "contiguous_max_model_len": s["contiguous"]["peak_concurrency"],
                     "contiguous_max_tokens": s["contiguous_max_tokens"]["peak_concurrency"],
                     "paged_mean": s["paged"]["mean_concurrency"],
                     "paged_preemptions": s["paged"]["preemptions"]})
    return {"mode": "memory", "workload": args.workload, "num_requests": args.num_requests,
            "block_size": args.block_size, "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
            "kv_bytes_per_token": args.kv_bytes_per_token, "rows": rows}


def memory_table(report: dict) -> str:
    lines = ["| KV blocks | KV tokens | KV MiB | paged peak seqs | contiguous (max_model_len) | "
             "contiguous (prompt+max_tokens) | paged / contiguous |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        base = r["contiguous_max_model_len"]
        ratio = f"{r['paged'] / base:.1f}x" if base else "contiguous fits none"
        lines.append(f"| {r['num_blocks']} | {r['kv_tokens']} | {r['kv_mib']:.0f} | {r['paged']} | {base} "
                     f"| {r['contiguous_max_tokens']} | {ratio} |")
    return "\n".join(lines)


def memory_plot(report: dict, path: str) -> None:
    plt = _pyplot()
    mib = [r["kv_mib"] for r in report["rows"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, color in (("paged", "paged", "tab:blue"),
                              ("contiguous_max_tokens", "contiguous, prompt+max_tokens", "tab:orange"),
                              ("contiguous_max_model_len", "contiguous, max_model_len", "tab:red")):
        ax.plot(mib, [r[key] for r in report["rows"]], "o-", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(mib, [f"{m:.0f}" for m in mib])
    ax.minorticks_off()
    ax.set_xlabel(f"KV cache (MiB at {report['kv_bytes_per_token']} bytes/token)")
    ax.set_ylabel("most sequences served at once")
    ax.legend(fontsize=8)
    ax.set_title(f"{report['workload']}: {report['num_requests']} requests, max_model_len "
                 f"{report['max_model_len']} (simulator)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ prefix cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(serve_args: list[str], ready_timeout: float = 600.0):
    """`pagedserve serve` on a free port in a child process; yields its base URL, SIGTERMs it after."""
    from services.launcher import wait_healthy

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", str(port), *serve_args],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", {"pagedserve serve": proc}, ready_timeout)
            yield f"http://127.0.0.1:{port}"
        except (RuntimeError, TimeoutError) as e:
            log.seek(0)
            tail = "".join(log.readlines()[-20:])
            raise RuntimeError(f"{e}\n--- server log (last lines) ---\n{tail}") from None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def prefix_sweep(args: argparse.Namespace) -> dict:
    args.dataset = "prefix-repetition"
    pool = load_pool(args.tokenizer)
    requests = build_dataset(args, pool)
    runs = {}
    for caching in ("on", "off"):
        flag = "--enable-prefix-caching" if caching == "on" else "--no-enable-prefix-caching"
        print(f"prefix caching {caching}: starting pagedserve serve {flag}", file=sys.stderr, flush=True)
        with running_server([*shlex.split(args.serve_args), flag], args.ready_timeout) as url:
            report = benchmark(url, requests, pool, LoadShape(args.request_rate, args.max_concurrency, args.seed),
                               api_key=args.api_key, ignore_eos=args.ignore_eos, num_warmups=args.num_warmups,
                               timeout=args.timeout, progress=not args.no_progress)
        runs[caching] = report["metrics"]
    return {"mode": "prefix", "num_prompts": len(requests), "num_prefixes": args.prefix_num_prefixes,
            "prefix_len": args.prefix_len, "suffix_len": args.prefix_suffix_len, "output_len": args.prefix_output_len,
            "max_concurrency": args.max_concurrency,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "serve_args": args.serve_args, "runs": runs, **prefix_ratios(runs)}


ROUTING_RUNS = (("1 engine", 1, "prefix"), ("2 engines, prefix", 2, "prefix"),
                ("2 engines, round-robin", 2, "round-robin"))


def engine_counters(url: str) -> dict[str, dict[str, float]]:
    """{counter: {engine: value}} of the prefix-cache and prompt-token counters on /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    names = ("pagedserve:prefix_cache_hits_total", "pagedserve:prefix_cache_queries_total",
             "pagedserve:prompt_tokens_total")
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in fam.samples:
            if sample.name in out:
                out[sample.name][sample.labels.get("engine", "0")] = sample.value
    return out


def routing_sweep(args: argparse.Namespace) -> dict:
    import time

    args.dataset = "prefix-repetition"
    pool = load_pool(args.tokenizer)
    requests = build_dataset(args, pool)
    runs = {}
    for name, dp, routing in ROUTING_RUNS:
        print(f"{name}: starting pagedserve serve --data-parallel-size {dp} --routing {routing}",
              file=sys.stderr, flush=True)
        with running_server([*shlex.split(args.serve_args), "--data-parallel-size", str(dp), "--routing", routing],
                            args.ready_timeout) as url:
            before = engine_counters(url)
            report = benchmark(url, requests, pool, LoadShape(args.request_rate, args.max_concurrency, args.seed),
                               api_key=args.api_key, ignore_eos=args.ignore_eos, num_warmups=args.num_warmups,
                               timeout=args.timeout, progress=not args.no_progress)
            time.sleep(0.6)                       # the gateway caches scheduler stats for 0.5 s
            after = engine_counters(url)
        delta = {n: {e: v - before[n].get(e, 0.0) for e, v in after[n].items()} for n in after}
        hits = sum(delta["pagedserve:prefix_cache_hits_total"].values())
        queries = sum(delta["pagedserve:prefix_cache_queries_total"].values())
        runs[name] = dict(report["metrics"], prefix_hit_rate=hits / queries if queries else 0.0,
                          prompt_tokens_per_engine=delta["pagedserve:prompt_tokens_total"])
    return {"mode": "routing", "num_prompts": len(requests), "num_prefixes": args.prefix_num_prefixes,
            "prefix_len": args.prefix_len, "suffix_len": args.prefix_suffix_len, "output_len": args.prefix_output_len,
            "max_concurrency": args.max_concurrency,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "serve_args": args.serve_args, "runs": runs}


def routing_table(report: dict) -> str:
    lines = ["| engines, routing | requests ok / failed | prefix hit rate | prompt tokens per engine | TTFT mean ms "
             "| TTFT p50 ms | output tok/s | requests/s |", "|---|---|---|---|---|---|---|---|"]
    for name, m in report["runs"].items():
        t = m["ttft_ms"]
        spread = " / ".join(f"{v:.0f}" for _, v in sorted(m["prompt_tokens_per_engine"].items()))
        lines.append(f"| {name} | {m['completed']} / {m['failed']} | {m['prefix_hit_rate']:.1%} | {spread} "
                     f"| {t['mean']:.0f} | {t['p50']:.0f} | {m['output_throughput']:.1f} "
                     f"| {m['request_throughput']:.2f} |")
    return "\n".join(lines)


def routing_plot(report: dict, path: str) -> None:
    plt = _pyplot()
    names = list(report["runs"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [report["runs"][n]["prefix_hit_rate"] * 100 for n in names], color="tab:blue")
    a.set_ylabel("prefix-cache hit rate (%)")
    b.bar(names, [report["runs"][n]["ttft_ms"]["mean"] for n in names], color="tab:gray")
    b.set_ylabel("mean time to first token (ms)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"prefix-repetition: {report['num_prefixes']} prefixes x {report['prefix_len']} tokens, "
                 f"{report['num_prompts']} requests, concurrency {report['max_concurrency']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prefix_ratios(runs: dict[str, dict]) -> dict[str, float | None]:
    """TTFT without the prefix cache divided by TTFT with it (mean and p50)."""
    def ratio(stat: str) -> float | None:
        on, off = runs["on"]["ttft_ms"][stat], runs["off"]["ttft_ms"][stat]
        return off / on if on > 0 and runs["on"]["completed"] and runs["off"]["completed"] else None
    return {"ttft_mean_ratio_off_to_on": ratio("mean"), "ttft_p50_ratio_off_to_on": ratio("p50")}


def prefix_table(report: dict) -> str:
    lines = ["| prefix caching | requests ok / failed | TTFT mean ms | TTFT p50 ms | TTFT p90 ms | E2EL mean ms "
             "| output tok/s |", "|---|---|---|---|---|---|---|"]
    for caching, m in report["runs"].items():
        t = m["ttft_ms"]
        lines.append(f"| {caching} | {m['completed']} / {m['failed']} | {t['mean']:.0f} | {t['p50']:.0f} "
                     f"| {t['p90']:.0f} | {m['e2el_ms']['mean']:.0f} | {m['output_throughput']:.1f} |")
    fmt = lambda v: f"{v:.2f}x" if v else "n/a"   # noqa: E731
    lines.append(f"\nTTFT off / on: mean {fmt(report['ttft_mean_ratio_off_to_on'])}, "
                 f"p50 {fmt(report['ttft_p50_ratio_off_to_on'])}")
    return "\n".join(lines)


def prefix_plot(report: dict, path: str) -> None:
    plt = _pyplot()
    stats = ("mean", "p50", "p90", "p99")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for k, (caching, color) in enumerate((("on", "tab:blue"), ("off", "tab:gray"))):
        values = [report["runs"][caching]["ttft_ms"][s] for s in stats]
        ax.bar([i + (k - 0.5) * width for i in range(len(stats))], values, width, color=color,
               label=f"prefix caching {caching}")
    ax.set_xticks(range(len(stats)), stats)
    ax.set_ylabel("time to first token (ms)")
    ax.legend(fontsize=8)
    ax.set_title(f"prefix-repetition: {report['num_prefixes']} prefixes x {report['prefix_len']} tokens + "
                 f"{report['suffix_len']}, {report['num_prompts']} requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI

MODES = {
    "concurrency": (concurrency_sweep, concurrency_table, concurrency_plot),
    "memory": (memory_sweep, memory_table, memory_plot),
    "prefix": (prefix_sweep, prefix_table, prefix_plot),
    "routing": (routing_sweep, routing_table, routing_plot),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="sweep_mode", metavar="MODE", required=True)

    c = sub.add_parser("concurrency", help="throughput and latency vs max concurrency against one server")
    add_client_arguments(c)
    add_dataset_arguments(c)
    c.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 64], help="levels, comma-separated")
    c.set_defaults(num_prompts=64)

    m = sub.add_parser("memory", help="max sequences at once vs KV memory, paged vs contiguous (simulator)")
    m.add_argument("--workload", choices=["mixed", "shared-prefix", "parallel-sampling"], default="mixed")
    m.add_argument("--num-blocks", type=_int_list, default=[256, 512, 1024, 2048, 4096])
    m.add_argument("--num-requests", type=int, default=400)
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--max-model-len", type=int, default=4096)
    m.add_argument("--max-num-seqs", type=int, default=1024)
    m.add_argument("--max-num-batched-tokens", type=int, default=2048)
    m.add_argument("--kv-bytes-per-token", type=int, default=SMOLLM2_KV_BYTES_PER_TOKEN,
                   help="to label memory in MiB (default: SmolLM2-135M in float32)")
    m.add_argument("--seed", type=int, default=0)

    x = sub.add_parser("prefix", help="TTFT with prefix caching on vs off (starts pagedserve serve twice)")
    add_client_arguments(x)
    add_dataset_arguments(x)
    x.add_argument("--serve-args", default="", help="extra `pagedserve serve` arguments, one quoted string")
    x.add_argument("--ready-timeout", type=float, default=600.0)
    x.add_argument("--request-rate", type=float, default=math.inf)
    x.add_argument("--max-concurrency", type=int, default=1,
                   help="default 1: TTFT is then the prefill alone, without queueing behind other requests")
    x.set_defaults(num_prompts=50, dataset="prefix-repetition")

    r = sub.add_parser("routing", help="data parallelism: one engine, two with prefix routing, two round-robin "
                                       "(starts pagedserve serve three times)")
    add_client_arguments(r)
    add_dataset_arguments(r)
    r.add_argument("--serve-args", default="", help="extra `pagedserve serve` arguments, one quoted string")
    r.add_argument("--ready-timeout", type=float, default=600.0)
    r.add_argument("--request-rate", type=float, default=math.inf)
    r.add_argument("--max-concurrency", type=int, default=8)
    r.set_defaults(num_prompts=60, dataset="prefix-repetition")

    for sp in (c, m, x, r):
        sp.add_argument("--out", default="", help="directory for sweep-<mode>.json and .png")


def run(args: argparse.Namespace) -> int:
    if args.sweep_mode == "memory":                   # the simulator: no server, no HTTP client
        http_errors: tuple[type[BaseException], ...] = ()
    else:
        import httpx
        http_errors = (httpx.HTTPError,)
    sweep, table, plot = MODES[args.sweep_mode]
    try:
        if args.sweep_mode in ("prefix", "routing"):
            check_load_args(args)
        if args.sweep_mode == "concurrency" and args.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
        report = sweep(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"pagedserve bench sweep {args.sweep_mode}: {e}", file=sys.stderr)
        return 1
    except http_errors as e:
        print(f"pagedserve bench sweep {args.sweep_mode}: cannot reach the server: {e}", file=sys.stderr)
        return 1
    print(table(report))
    if args.out:
        _save(args.out, args.sweep_mode, report, plot)
    return 0
