"""`pagedserve executor`: the model worker behind a ZeroMQ ROUTER.

Loop: receive a routed frame -> decode (a bad frame is answered with ExecutorError and the loop
goes on) -> ExecutorHello: forget all sequence state, ExecutorReady; StepPlan: ``Worker.execute`` -> StepResult or
ExecutorError; Shutdown: exit 0. The socket is bound only once the weights are loaded and the KV
cache allocated, so a TCP health check on the port means "ready".

Deferred masks: a StepPlan with ``mask_seq_ids`` and no ``masks`` is followed by a StepMasks
frame, which the scheduler computes while the forward pass runs. The worker asks for it after
the forward (``deferred_masks``): the next frame, within ``MASKS_TIMEOUT_S``, must be the
StepMasks of that step from the same peer; anything else (a timeout, another message or step, a
bad frame, another peer) is consumed and fails the step with ExecutorError. A StepMasks met by
the loop itself belongs to a plan that failed before asking for it (validation, the forward) and
was answered already: it is dropped without a reply.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable

import zmq

from shared import transport
from shared.config import ConfigError, add_options, config_from_args
from shared.messages import (
    ExecutorError, ExecutorHello, ProtocolError, Shutdown, StepMasks, StepPlan,
)

log = logging.getLogger("pagedserve.executor")

MASKS_TIMEOUT_S = 60.0      # the wait for a deferred StepMasks after the forward pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, "executor")


def forget_sequences(worker) -> None:
    """A hello opens a new conversation: a restarted scheduler numbers its sequences from 0 again
    and knows nothing of the old ones, so their state (not the weights, not the KV memory) goes.
    A hello also follows a failed step (the scheduler failed every request with state here, and
    the step may have run in part), so nothing the executor holds can disagree with the next plan."""
    worker.forget()


class MasksFrameError(RuntimeError):
    """The frame after a plan with deferred masks was not its StepMasks (the step fails)."""


def deferred_masks(sock: zmq.Socket, identity: bytes, step_id: int,
                   timeout_s: float = MASKS_TIMEOUT_S) -> Callable[[], bytes]:
    """The ``masks`` callable of ``Worker.execute`` for step ``step_id``: receives the next frame."""
    def receive() -> bytes:
        want = f"the StepMasks of step {step_id}"
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise MasksFrameError(f"no StepMasks for step {step_id} within {timeout_s:g}s")
        sender, msg = transport.recv_routed(sock)
        if sender != identity:
            raise MasksFrameError(f"expected {want}, got a frame from another peer")
        if isinstance(msg, ProtocolError):
            raise MasksFrameError(f"expected {want}, got a bad frame: {msg}")
        if not isinstance(msg, StepMasks):
            raise MasksFrameError(f"expected {want}, got {type(msg).__name__}")
        if msg.step_id != step_id:
            raise MasksFrameError(f"expected {want}, got those of step {msg.step_id}")
        return msg.masks
    return receive


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
            masks = deferred_masks(sock, identity, msg.step_id) if msg.mask_seq_ids and not msg.masks else None
            transport.send(sock, worker.execute(msg, masks), identity)
        elif isinstance(msg, StepMasks):       # its plan failed before asking for it: answered already
            log.debug("dropping the masks of step %d, whose plan failed before using them", msg.step_id)
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
    import torch                                   # only once the flags are good

    from services.executor.parallel import follow
    from services.executor.worker import Worker, start_worker

    group = None
    try:
        if config.tensor_parallel_size > 1:
            worker, group = start_worker(full)
        else:
            if full.process.num_threads:
                torch.set_num_threads(full.process.num_threads)
            worker = Worker(config)
    except ConfigError as e:
        print(f"pagedserve executor: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, MemoryError, RuntimeError) as e:
        print(f"pagedserve executor: {e}", file=sys.stderr)
        return 1
    if group is not None and group.tp.rank > 0:
        try:
            return follow(worker)
        finally:
            group.close()
    ready = worker.ready()
    log.info("model %s on %s: %d blocks of %d tokens (+%d host), max_model_len %d, %d tokens and %d sequences "
             "per step, attention backend %s, %d CPU threads", ready.model, ready.device, ready.num_blocks,
             ready.block_size, ready.num_host_blocks, ready.max_model_len, ready.max_num_batched_tokens, ready.max_num_seqs,
             worker.backend.name, torch.get_num_threads())
    ctx = zmq.Context()
    sock = transport.router(ctx, addr)
    log.info("executor listening on %s", addr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return serve(worker, sock)
    finally:
        sock.close(linger=0)
        ctx.term()
        if group is not None:
            group.close(timeout=5)
