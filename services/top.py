"""`pagedserve top --url URL`: a live terminal view of one server, from its /metrics each second.

Rates (hit, eviction, recompute, tokens/s) are the difference of two scrapes over the time between
them. Latency percentiles come from the histogram buckets observed in that interval, or from every
observation since the start when the interval saw none (the screen says which). One row per engine
when the gateway fronts several, and a total.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

P = "pagedserve:"


@dataclass
class Scrape:
    """One /metrics text, per engine: plain samples by name, histogram buckets by family."""
    time: float
    values: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))   # engine -> name -> v
    buckets: dict[str, dict[str, dict[float, float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict)))                         # engine -> family -> le -> n

    @classmethod
    def parse(cls, text: str, at: float) -> "Scrape":
        s = cls(at)
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as e:
            raise ValueError(f"not a Prometheus metrics text ({e}): is it a pagedserve server's /metrics?") from None
        for fam in families:
            for sample in fam.samples:
                if not sample.name.startswith(P) or "finished_reason" in sample.labels:
                    continue
                engine = sample.labels.get("engine", "0")
                name = sample.name[len(P):]
                if name.endswith("_bucket"):
                    s.buckets[engine][name[:-len("_bucket")]][float(sample.labels["le"])] = sample.value
                else:
                    s.values[engine][name] = s.values[engine].get(name, 0.0) + sample.value
        if not s.values:
            raise ValueError("no pagedserve: metrics in this text (is it a pagedserve server's /metrics?)")
        return s


def quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile on cumulative ``{le: count}``: linear within the bucket."""
    if not buckets:
        return math.nan
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound           # the +Inf bucket: its lower bound, as Prometheus does
            return prev_bound + (b - prev_bound) * (rank - prev_count) / max(c - prev_count, 1e-12)
        prev_bound, prev_count = b, c
    return bounds[-1]


def _delta(cur: dict[float, float], prev: dict[float, float]) -> dict[float, float]:
    return {le: n - prev.get(le, 0.0) for le, n in cur.items()}


def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _ratio(num: float, den: float) -> str:
    return "-" if den <= 0 else f"{100 * num / den:.1f}%"


def render(prev: Scrape, cur: Scrape, url: str = "") -> Group:
    """The screen for two scrapes (``prev`` before ``cur``)."""
    dt = max(cur.time - prev.time, 1e-9)
    engines = sorted(cur.values, key=lambda e: (len(e), e))
    rows = engines + (["all"] if len(engines) > 1 else [])

    def v(engine: str, name: str, scrape: Scrape = cur) -> float:
        if engine == "all":
            return sum(scrape.values[e].get(name, 0.0) for e in engines)
        return scrape.values[engine].get(name, 0.0)

    def d(engine: str, name: str) -> float:
        return v(engine, name) - v(engine, name, prev)

    state = Table(title="requests and KV cache", expand=True)
    for col in ("engine", "running", "waiting", "swapped", "KV usage", "blocks free", "executor"):
        state.add_column(col, justify="right")
    rates = Table(title=f"over the last {dt:.1f} s", expand=True)
    for col in ("engine", "gen tok/s", "computed tok/s", "recomputed tok/s", "prefix hit rate",
                "evictions/s", "preemptions/s", "swap out/in blk/s"):
        rates.add_column(col, justify="right")
    for e in rows:
        blocks = v(e, "num_total_blocks")
        ready = (f"{v(e, 'executor_ready'):.0f}/{len(engines)}" if e == "all"
                 else ("ready" if v(e, "executor_ready") else "not ready"))
        state.add_row(e, f"{v(e, 'num_requests_running'):.0f}", f"{v(e, 'num_requests_waiting'):.0f}",
                      f"{v(e, 'num_requests_swapped'):.0f}",
                      _ratio(blocks - v(e, "num_free_blocks"), blocks), f"{v(e, 'num_free_blocks'):.0f}", ready)
        rates.add_row(e, f"{d(e, 'generation_tokens_total') / dt:.1f}", f"{d(e, 'iteration_tokens_sum') / dt:.1f}",
                      f"{d(e, 'recomputed_tokens_total') / dt:.1f}",
                      _ratio(d(e, "prefix_cache_hits_total"), d(e, "prefix_cache_queries_total")),
                      f"{d(e, 'prefix_cache_evictions_total') / dt:.2f}", f"{d(e, 'num_preemptions_total') / dt:.2f}",
                      f"{d(e, 'swapped_out_blocks_total') / dt:.1f}/{d(e, 'swapped_in_blocks_total') / dt:.1f}")

    lat = Table(title="latency", expand=True)
    for col in ("engine", "metric", "window", "p50", "p90", "p99"):
        lat.add_column(col, justify="right")
    for e in engines:
        for fam, label in (("time_to_first_token_seconds", "TTFT"), ("inter_token_latency_seconds", "ITL")):
            cur_b, prev_b = cur.buckets[e].get(fam, {}), prev.buckets[e].get(fam, {})
            window, b = "interval", _delta(cur_b, prev_b)
            if not b or max(b.values(), default=0) <= 0:
                window, b = "since start", cur_b
            lat.add_row(e, label, window, *(_fmt_s(quantile(b, q)) for q in (0.5, 0.9, 0.99)))
    head = Text(f"pagedserve top  {url}  (Ctrl-C to quit)", style="bold")
    return Group(head, state, rates, lat)


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metrics_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (its /metrics is read)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one screen (two scrapes an interval apart) and exit")


def run(args) -> int:
    from rich.live import Live

    if not args.interval > 0:
        raise SystemExit("pagedserve top: --interval must be > 0")
    url, console = metrics_url(args.url), Console()
    try:
        prev = Scrape.parse(fetch(url), time.monotonic())
        if args.once:
            time.sleep(args.interval)
            console.print(render(prev, Scrape.parse(fetch(url), time.monotonic()), url))
            return 0
        with Live(render(prev, prev, url), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(args.interval)
                cur = Scrape.parse(fetch(url), time.monotonic())
                live.update(render(prev, cur, url), refresh=True)
                prev = cur
    except KeyboardInterrupt:
        return 0
    except (urllib.error.URLError, OSError) as e:
        print(f"pagedserve top: cannot read {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"pagedserve top: {url}: {e}", file=sys.stderr)
        return 1
