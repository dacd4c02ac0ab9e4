"""`pagedserve gateway`: the HTTP gateway as a process. Its flags are the options of
shared/config.py that the gateway uses."""
from __future__ import annotations

import argparse
import logging

from shared.config import GatewayConfig, add_options, config_from_args

from . import protocol as P
from .engine_client import EngineClient
from .lifecycle import serve
from .server import build_app


def uvicorn_options(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                    max_header_bytes: int = GatewayConfig.max_header_bytes, limit_concurrency: int = 0) -> dict:
    """uvicorn settings that bound what a client can make the HTTP layer hold: h11 (whose buffer
    for a header block arriving in pieces is bounded) and, optionally, open connections."""
    return dict(host=host, port=port, log_level=log_level, http="h11",
                h11_max_incomplete_event_size=max_header_bytes,
                limit_concurrency=limit_concurrency or None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, "gateway")


def run(args: argparse.Namespace) -> int:
    from shared.model_path import resolve_model
    from shared.tokenizer import load_tokenizer
    from shared.transport import check_address

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args, "gateway")
        gw = config.gateway
        addrs = [check_address(a) for a in gw.scheduler_addr]
        src = resolve_model(config.engine.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagedserve gateway: {e}")
        return 2
    if gw.max_n > P.MAX_N:
        print(f"pagedserve gateway: --max-n must be in 1..{P.MAX_N}, got {gw.max_n}")
        return 2
    tokenizer = load_tokenizer(src)
    app = build_app(EngineClient(addrs, routing=gw.routing), tokenizer, gw.served_model_name or src.name,
                    config.engine.scheduler.max_model_len, gw.api_key or None, gw.max_body_bytes, gw.max_n,
                    gw.max_header_bytes, gw.tool_call_parser, gw.prefix_cache_salt_required)
    serve(app, gw.drain_timeout, **uvicorn_options(gw.host, gw.port, config.process.log_level,
                                                   gw.max_header_bytes, gw.limit_concurrency))
    return 0
