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
from shared.config import ConfigError, add_options, config_from_args
from shared.messages import (
    ExecutorError, ExecutorHello, ProtocolError, Shutdown, StepPlan,
)

log = logging.getLogger("pagedserve.executor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, "executor")


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
        full = config_from_args(args, "executor")
        config = full.engine
        addr = transport.check_address(full.process.addr) if full.process.addr else \
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
    log.info("model %s on %s: %d blocks of %d tokens (+%d host), max_model_len %d, %d tokens and %d sequences "
             "per step, attention backend %s", ready.model, ready.device, ready.num_blocks, ready.block_size,
             ready.num_host_blocks, ready.max_model_len, ready.max_num_batched_tokens, ready.max_num_seqs,
             worker.backend.name)
    ctx = zmq.Context()
    sock = transport.router(ctx, addr)
    log.info("executor listening on %s", addr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return serve(worker, sock)
    finally:
        sock.close(linger=0)
        ctx.term()
