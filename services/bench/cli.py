"""`pagedserve bench serve|compare|sweep`: one sub-subcommand per module, each with
``add_arguments(parser)`` and ``run(args)``. The modules import only argparse-level things at the
top (no torch, no httpx), so building this parser stays cheap."""
from __future__ import annotations

import argparse
import sys

from . import compare, serve, sweep

TOOLS = {
    "serve": (serve, "load generator against a running OpenAI-compatible server (TTFT, TPOT, ITL, throughput)"),
    "compare": (compare, "offline output tok/s: pagedserve vs HF generate vs generate_batch, one process each"),
    "sweep": (sweep, "sweeps: throughput vs concurrency, max sequences vs KV memory, prefix cache on/off TTFT, "
                     "data-parallel routing"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", metavar="TOOL", required=True)
    for name, (module, help_text) in TOOLS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    module, _ = TOOLS[args.bench_command]
    offline = module is compare or getattr(args, "sweep_mode", None) == "memory"   # no HTTP client
    if not offline:
        try:
            import httpx  # noqa: F401
        except ImportError:
            print("pagedserve bench: the HTTP client is missing: pip install 'pagedserve[bench]' (httpx)",
                  file=sys.stderr)
            return 2
    return module.run(args)
