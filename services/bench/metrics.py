"""Per-request timings -> serving metrics, defined as vLLM's benchmark_serving defines them.

  TTFT  time to first token: request sent -> first chunk with text
  TPOT  time per output token, per request: (e2e - ttft) / (output_tokens - 1), requests with > 1 token
  ITL   inter-token latency: every gap between consecutive text chunks, all requests pooled
  E2EL  end-to-end latency: request sent -> last byte
Each is reported in milliseconds as mean, p50, p90 and p99 (numpy's linear percentiles).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")
_NAMES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
          "itl": "Inter-token latency", "e2el": "End-to-end latency"}


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0              # tokens, the server's count when it reports usage
    output_tokens: int = 0
    ttft: float = 0.0                # seconds
    latency: float = 0.0             # seconds, end to end
    itl: list[float] = field(default_factory=list)   # seconds between consecutive text chunks
    error: str = ""


def _summary(values_s: list[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 in milliseconds (zeros when empty, as vLLM reports them)."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if ms.size == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    pct = np.percentile(ms, PERCENTILES)
    return {"mean": float(ms.mean()), **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}}


def compute_metrics(results: list[RequestResult], duration_s: float) -> dict:
    """Aggregate metrics over a run that took ``duration_s`` seconds of wall time."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    dur = max(duration_s, 1e-9)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.success).most_common()),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "ttft_ms": _summary([r.ttft for r in ok]),
        "tpot_ms": _summary(tpots),
        "itl_ms": _summary([gap for r in ok for gap in r.itl]),
        "e2el_ms": _summary([r.latency for r in ok]),
    }


def format_table(metrics: dict, title: str = "Serving benchmark") -> str:
    """The metrics as a plain-text table, vLLM-style."""
    rows = [
        ("Successful requests", f"{metrics['completed']}"),
        ("Failed requests", f"{metrics['failed']}"),
        ("Benchmark duration (s)", f"{metrics['duration_s']:.2f}"),
        ("Total input tokens", f"{metrics['total_input_tokens']}"),
        ("Total generated tokens", f"{metrics['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{metrics['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{metrics['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics['total_token_throughput']:.2f}"),
    ]
    for key in LATENCIES:
        rows.append((f"-- {_NAMES[key]} (ms)", ""))
        for stat, value in metrics[f"{key}_ms"].items():
            rows.append((f"{stat.upper() if stat != 'mean' else 'Mean'} {key.upper()}", f"{value:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    line = "=" * (width + 14)
    body = "\n".join(f"{k:<{width}}{v:>14}" if v else k for k, v in rows)
    errors = "".join(f"\nerror x{count}: {message}" for message, count in metrics["errors"].items())
    return f"{line}\n{title:^{width + 14}}\n{line}\n{body}\n{line}{errors}"
