"""`pagedserve bench serve`: a load generator against a running OpenAI-compatible server.

Streams `/v1/completions` (``stream: true``, ``stream_options.include_usage``) with httpx, one
task per request: arrivals are a Poisson process of ``--request-rate`` requests/s (``inf``: all at
once), optionally capped at ``--max-concurrency`` requests in flight. Timings are taken on the
client per text chunk (see services/bench/metrics.py for the definitions). HTTP errors, error
events in the stream and connection failures are counted per message, never raised.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from .datasets import BenchRequest, WordPool, add_dataset_arguments, build_dataset
from .metrics import RequestResult, compute_metrics, format_table


@dataclass
class LoadShape:
    request_rate: float = math.inf      # requests/s, Poisson; inf = all at once
    max_concurrency: int | None = None  # requests in flight at most; None = unbounded
    seed: int = 0


def _error_message(status: int, body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return f"HTTP {status}: {err.get('message', err)}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


async def send_request(client, url: str, body: dict, headers: dict, prompt_len: int) -> RequestResult:
    """One streamed completion; every failure ends up in ``result.error``."""
    import httpx

    result = RequestResult(prompt_len=prompt_len)
    chunks, usage = 0, None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = _error_message(resp.status_code, await resp.aread())
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    result.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                if any(c.get("text") for c in event.get("choices") or ()):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, OSError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    result.latency = time.perf_counter() - start
    if chunks == 0:
        result.error = "no text in the stream"
        return result
    result.output_tokens = usage["completion_tokens"] if usage else chunks
    result.prompt_len = usage["prompt_tokens"] if usage else prompt_len
    result.success = True
    return result


def _body(model: str, req: BenchRequest, ignore_eos: bool) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True          # vLLM / pagedserve extension: every request runs to max_tokens
    return body


async def run_requests(base_url: str, model: str, requests: list[BenchRequest], shape: LoadShape,
                       api_key: str = "", ignore_eos: bool = True, num_warmups: int = 0,
                       warmup: list[BenchRequest] = (), endpoint: str = "/v1/completions",
                       timeout: float = 600.0, progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send ``requests`` with the given arrival shape; returns (results in request order, seconds)."""
    import httpx
    from tqdm import tqdm

    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=shape.max_concurrency or len(requests), max_keepalive_connections=None)
    rng = np.random.default_rng(shape.seed)
    gaps = (np.zeros(len(requests)) if math.isinf(shape.request_rate)
            else rng.exponential(1.0 / shape.request_rate, size=len(requests)))
    gate = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
        for w in warmup[:num_warmups]:   # one at a time, not timed
            await send_request(client, url, _body(model, w, ignore_eos), headers, w.prompt_len)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress, file=sys.stderr)

        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                res = await send_request(client, url, _body(model, req, ignore_eos), headers, req.prompt_len)
            else:
                async with gate:
                    res = await send_request(client, url, _body(model, req, ignore_eos), headers, req.prompt_len)
            bar.update()
            return res

        start = time.perf_counter()
        tasks = []
        for req, gap in zip(requests, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


def served_model(base_url: str, api_key: str = "") -> str:
    """The first model id of ``GET /v1/models``."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def benchmark(base_url: str, requests: list[BenchRequest], pool: WordPool, shape: LoadShape, *,
              model: str = "", api_key: str = "", ignore_eos: bool = True, num_warmups: int = 0,
              endpoint: str = "/v1/completions", timeout: float = 600.0, progress: bool = True) -> dict:
    """Run one benchmark and return {"config": ..., "metrics": ...} (what --output-json writes)."""
    model = model or served_model(base_url, api_key)
    rng = np.random.default_rng(shape.seed + 1)
    # warm-up prompts are random words, so they put nothing in the prefix cache the dataset can hit
    warmup = [BenchRequest(pool.text(rng, r.prompt_len), r.prompt_len, r.output_len)
              for r in requests[:num_warmups]]
    results, duration = asyncio.run(run_requests(base_url, model, requests, shape, api_key, ignore_eos,
                                                 num_warmups, warmup, endpoint, timeout, progress))
    config = {"base_url": base_url, "endpoint": endpoint, "model": model, "num_prompts": len(requests),
              "request_rate": "inf" if math.isinf(shape.request_rate) else shape.request_rate,
              "max_concurrency": shape.max_concurrency, "num_warmups": num_warmups, "ignore_eos": ignore_eos,
              "seed": shape.seed, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "client_machine": f"{platform.machine()} {os.cpu_count()} cpus"}
    return {"config": config, "metrics": compute_metrics(results, duration)}


# ------------------------------------------------------------------------------------------ CLI


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """Server, load-shape and output arguments (shared with `bench sweep`)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default="", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--tokenizer", default="",
                   help="tokenizer for building prompts by token count: .gguf file or HF folder "
                        "(default: the bundled SmolLM2)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", os.environ.get("PAGEDSERVE_API_KEY", "")))
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent one by one first")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask every request to run to max_tokens (vLLM extension)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_client_arguments(p)
    add_dataset_arguments(p)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--output-json", default="", help="write config and metrics here")


def load_pool(tokenizer: str) -> WordPool:
    from shared.tokenizer import load_tokenizer

    return WordPool(load_tokenizer(tokenizer))


def check_load_args(args: argparse.Namespace) -> None:
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf for all at once), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")


def run(args: argparse.Namespace) -> int:
    import httpx

    try:
        check_load_args(args)
        pool = load_pool(args.tokenizer)
        requests = build_dataset(args, pool)
        report = benchmark(args.base_url, requests, pool,
                           LoadShape(args.request_rate, args.max_concurrency, args.seed), model=args.model,
                           api_key=args.api_key, ignore_eos=args.ignore_eos, num_warmups=args.num_warmups,
                           endpoint=args.endpoint, timeout=args.timeout, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagedserve bench serve: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"pagedserve bench serve: cannot reach {args.base_url}: {e}", file=sys.stderr)
        return 1
    report["config"]["dataset"] = args.dataset
    print(format_table(report["metrics"], f"{args.dataset} x {len(requests)}"))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["metrics"]["completed"] else 1
