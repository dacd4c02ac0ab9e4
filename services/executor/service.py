"""`pagedserve executor`: the model worker behind a ZeroMQ ROUTER.

Loop: receive a routed frame -> decode (a bad frame is answered with ExecutorError and the loop
goes on) -> ExecutorHello: forget all sequence state, ExecutorReady; StepPlan: ``Worker.execute`` -> StepResult or
ExecutorError; Shutdown: exit 0. The socket is bound only once the weights are loaded and the KV
cache allocated, so a TCP health check on the port means "ready".
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import zmq

from shared import transport
from shared.config import ATTENTION_BACKENDS, CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from shared.messages import (
    ExecutorError, ExecutorHello, ProtocolError, Shutdown, StepPlan,
)

log = logging.getLogger("pagedserve.executor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default="", help="ROUTER bind address (default: ipc:// in a private temp dir)")
    p.add_argument("--model", default="", help="HF folder, .gguf file, random:<preset>, or '' for the bundled "
                                              "SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks (0 = size from the memory budget)")
    p.add_argument("--num-host-blocks", type=int, default=0,
                   help="host swap pool blocks (0 = a quarter of the device blocks)")
    p.add_argument("--kv-cache-memory", type=int, default=0, help="bytes for the KV cache (0 = derive)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, attention_backend=args.attention_backend,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
        seed=args.seed,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          num_host_blocks=args.num_host_blocks),
        scheduler=SchedulerConfig(max_model_len=args.max_model_len,
                                  max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_model_len)),
    ).validate()


def forget_sequences(worker) -> None:
    """A hello opens a new conversation: a restarted scheduler numbers its sequences from 0 again
    and knows nothing of the old ones, so their state (not the weights, not the KV memory) goes.
    Every hello comes before the first plan of its conversation, so nothing live is dropped."""
    worker.seqs.clear()


def serve(worker, sock: zmq.Socket) -> int:
    """Answer frames on a bound ROUTER until Shutdown. Returns the exit code."""
    while True:
        identity, msg = transport.recv_routed(sock)
        if isinstance(msg, ProtocolError):
            log.warning("bad frame: %s", msg)
            transport.send(sock, ExecutorError(step_id=-1, message=str(msg)), identity)
            continue
        if isinstance(msg, ExecutorHello):
            if msg.block_size != worker.block_size:
                transport.send(sock, ExecutorError(
                    step_id=-1, message=f"block size mismatch: scheduler {msg.block_size}, "
                                        f"executor {worker.block_size}"), identity)
            else:
                forget_sequences(worker)
                transport.send(sock, worker.ready(), identity)
        elif isinstance(msg, StepPlan):
            transport.send(sock, worker.execute(msg), identity)
        elif isinstance(msg, Shutdown):
            log.info("shutdown requested")
            return 0
        else:
            transport.send(sock, ExecutorError(step_id=-1, message=f"unexpected message {type(msg).__name__}"),
                           identity)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = engine_config(args)
        addr = transport.check_address(args.addr) if args.addr else \
            transport.ipc_address(transport.runtime_dir(), "executor")
    except (ConfigError, ValueError) as e:
        print(f"pagedserve executor: {e}", file=sys.stderr)
        return 2
    from services.executor.worker import Worker   # imports torch: only once the flags are good

    try:
        worker = Worker(config)
    except (FileNotFoundError, ValueError, MemoryError, RuntimeError) as e:
        print(f"pagedserve executor: {e}", file=sys.stderr)
        return 1
    ready = worker.ready()
    log.info("model %s on %s: %d blocks of %d tokens (+%d host), max_model_len %d, attention backend %s",
             ready.model, ready.device, ready.num_blocks, ready.block_size, ready.num_host_blocks,
             ready.max_model_len, worker.backend.name)
    ctx = zmq.Context()
    sock = transport.router(ctx, addr)
    log.info("executor listening on %s", addr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return serve(worker, sock)
    finally:
        sock.close(linger=0)
        ctx.term()
