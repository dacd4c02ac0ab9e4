"""`pagedserve` command line: one subcommand per service plus serve, generate and simulate.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so `pagedserve scheduler` never imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("services.launcher", "start scheduler, executor and gateway and serve the OpenAI API"),
    "scheduler": ("services.scheduler.cli", "run the scheduler service alone (pure CPU, no torch)"),
    "executor": ("services.executor.service", "run the model executor worker"),
    "gateway": ("services.gateway.cli", "run the HTTP gateway (OpenAI-compatible API)"),
    "generate": ("services.offline", "offline batch generation for a list of prompts"),
    "simulate": ("services.scheduler.sim.simulate", "replay a synthetic workload: paged vs contiguous KV memory"),
    "bench": ("services.bench.cli", "benchmark tools: bench serve | bench compare | bench sweep"),
    "top": ("services.top", "a live terminal view of a server's /metrics (requests, KV cache, paging, latency)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="pagedserve", description="LLM serving on PagedAttention")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
