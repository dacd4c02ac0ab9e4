"""Tensor parallelism: N executor ranks in one torch.distributed group (gloo on CPU, NCCL on CUDA).

Megatron-style sharding of the one decoder (model.py), done on a loaded model by ``shard_model``:

* attention: rank r keeps query heads [r*Hq/N, (r+1)*Hq/N) (wqkv's columns, wo's rows) and the KV
  heads they read: Hkv/N of them, or, when N exceeds Hkv, the one KV head its query heads share
  (replicated on N/Hkv ranks). Its KV cache holds only those heads, under the same block tables;
* MLP: gate and up split by columns, down by rows (I/N each);
* one all-reduce after attention's output projection and one after the MLP (``TensorParallel``
  is the block's ``reduce``); a row-parallel bias is added by rank 0 alone;
* embedding and LM head vocab-parallel: rank r holds vocab rows [r*Vp/N, (r+1)*Vp/N) (Vp: V padded
  to a multiple of N); a lookup is masked to the rank's rows and all-reduced, and the logits of
  the sampled rows are all-gathered (then cut back to V).

The scheduler talks to rank 0 only. Rank 0 broadcasts each step plan (its msgpack bytes: a length,
then the bytes) before running it, every rank runs the same forward, rank 0 samples, and
broadcasts the sampled token ids, which every rank appends to its copy of the sequences. Ranks
1..N-1 run ``follow``: receive a plan, run it, repeat; an empty plan ends them. A rank that dies
breaks the group's next collective on the others, which then exit: a dead rank is a dead executor,
and the scheduler's recovery starts a new group.

Not here: MoE layers (refused), pipeline parallelism, a shared-memory all-reduce for CPUs (gloo's
costs about 0.7 ms per all-reduce on this project's 2-core VM; docs/BENCHMARKS.md).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from services.executor.model import ModelConfig, Transformer, UnsupportedModel

if TYPE_CHECKING:
    from shared.config import Config, EngineConfig

log = logging.getLogger("pagedserve.executor")
TIMEOUT_ENV = "PAGEDSERVE_DIST_TIMEOUT_S"    # seconds a model collective may wait for a peer (600)


def free_tcp_address(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


@dataclass
class TensorParallel:
    """This process's place in the group and the collectives the model and worker need.

    Two process groups: the default one (NCCL on CUDA, gloo on CPU; ``timeout_s``) carries the
    model's all-reduces and all-gathers, and a gloo ``control`` group on CPU tensors carries rank
    0's broadcasts (plans, tokens, sizes). The control group never times out: ranks 1..N-1 wait
    in it for the next plan as long as the server is idle. A dead rank still breaks it at once."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: Optional[object] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def join(cls, rank: int, world_size: int, init: str, device: torch.device,
             timeout_s: float = 600.0) -> "TensorParallel":
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=3650))
        return cls(rank, world_size, device, control)

    def all_reduce(self, x: Tensor) -> Tensor:
        dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: Tensor, vocab_size: int) -> Tensor:
        # logits [S, Vp/N] of this rank's vocab rows -> [S, V] on every rank
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def broadcast_bytes(self, data: Optional[bytes]) -> bytes:
        """Rank 0's ``data`` on every rank (a length, then the bytes; the control group)."""
        n = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.control)
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if buf.numel():
            dist.broadcast(buf, 0, group=self.control)
        return data if self.rank == 0 else bytes(buf.numpy())

    def broadcast_ints(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(t, 0, group=self.control)
        return t.tolist()

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to exit (they may be gone already), then leave the group."""
        if self.enabled and self.rank == 0:
            try:
                self.broadcast_bytes(b"")
            except RuntimeError as e:
                log.warning("tensor-parallel shutdown: %s", e)
        if dist.is_initialized():
            dist.destroy_process_group()


NO_PARALLEL = TensorParallel()


# ------------------------------------------------------------------------------ sharding

def local_shape(cfg: ModelConfig, world: int) -> tuple[int, int, int, int]:
    """(query heads, KV heads, intermediate size, padded vocab / N) per rank; refuses what does not split."""
    if cfg.num_experts:
        raise UnsupportedModel(f"tensor parallel for MoE models ({cfg.architecture}) is not implemented")
    for what, n in (("num_attention_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)):
        if n % world:
            raise UnsupportedModel(f"tensor parallel size {world} does not divide the model's {what} ({n})")
    hkv = cfg.num_kv_heads
    if hkv % world and world % hkv:
        raise UnsupportedModel(f"tensor parallel size {world} and the model's {hkv} KV heads: one must "
                               "divide the other")
    vocab_local = -(-cfg.vocab_size // world)
    return cfg.num_heads // world, max(1, hkv // world), cfg.intermediate_size // world, vocab_local


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The per-rank shapes (what one rank's modules and KV cache hold)."""
    hq, hkv, inter, vocab = local_shape(cfg, world)
    return replace(cfg, num_heads=hq, num_kv_heads=hkv, intermediate_size=inter, vocab_size=vocab)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + n) of the embedding; a lookup of any id, all-reduced."""

    def __init__(self, weight: Tensor, start: int, tp: TensorParallel):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)      # [Vp/N, D]
        self.start, self.tp = start, tp

    def forward(self, ids: Tensor) -> Tensor:
        # ids [T] -> [T, D]
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(x)


def _rows(t: Tensor, start: int, n: int) -> Tensor:
    """Rows [start, start + n) of t, zero-padded past its end (the padded vocab)."""
    out = t.new_zeros((n, *t.shape[1:]))
    part = t[start:min(start + n, t.shape[0])]
    out[:part.shape[0]] = part
    return out


def shard_model(full: Transformer, cfg: ModelConfig, tp: TensorParallel) -> tuple[Transformer, ModelConfig]:
    """This rank's part of a loaded model (same dtype and device), and its local config."""
    N, r = tp.world_size, tp.rank
    lc = local_config(cfg, N)
    hq, hkv, inter, vocab = lc.num_heads, lc.num_kv_heads, lc.intermediate_size, lc.vocab_size
    Dh = cfg.head_dim
    kv0 = r * hkv if cfg.num_kv_heads >= N else r * cfg.num_kv_heads // N     # first KV head of this rank
    q_cols = torch.arange(r * hq * Dh, (r + 1) * hq * Dh)
    k_cols = cfg.num_heads * Dh + torch.arange(kv0 * Dh, (kv0 + hkv) * Dh)
    v_cols = k_cols + cfg.num_kv_heads * Dh
    qkv_cols = torch.cat((q_cols, k_cols, v_cols))
    i_cols = torch.arange(r * inter, (r + 1) * inter)
    state = {}
    for name, t in full.state_dict().items():
        if name.endswith("attention.wqkv.weight_t"):
            t = t[:, qkv_cols]
        elif name.endswith("attention.wqkv.bias"):
            t = t[qkv_cols]
        elif name.endswith("attention.wo.weight_t"):
            t = t[q_cols]
        elif name.endswith("attention.wo.bias") or name.endswith("feed_forward.w2.bias"):
            t = t if r == 0 else torch.zeros_like(t)       # row-parallel: added once
        elif name.endswith("feed_forward.w13.weight_t"):
            t = t[:, torch.cat((i_cols, cfg.intermediate_size + i_cols))]
        elif name.endswith("feed_forward.w2.weight_t"):
            t = t[i_cols]
        elif name in ("tok_embeddings.weight", "output.weight"):
            t = _rows(t, r * vocab, vocab)
        state[name] = t.clone()
    with torch.device("meta"):
        model = Transformer(lc, full.max_seq_len)
    model.load_state_dict(state, assign=True)
    model.build_rope()
    model = model.to(device=full.rope.device).eval().requires_grad_(False)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings.weight.data, r * vocab, tp)
    model.tp = tp
    model.full_vocab_size = cfg.vocab_size
    for block in model.layers:
        block.reduce = tp.all_reduce
    return model, lc


# ------------------------------------------------------------------------------ the group's processes

def follower_command(argv: list[str], rank: int, init: str) -> list[str]:
    """The executor command line of rank ``rank`` (the same options as rank 0's)."""
    return [sys.executable, "-m", "services.executor", *argv, "--rank", str(rank), "--dist-init", init]


def spawn_followers(argv: list[str], world: int, init: str) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 of this machine's group; they die with this process (Linux)."""
    from services.launcher import _die_with_parent

    return [subprocess.Popen(follower_command(argv, rank, init), start_new_session=True,
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            for rank in range(1, world)]


@dataclass
class Group:
    """This process's rank, the engine config it runs with, and the ranks it started."""
    tp: TensorParallel
    engine: "EngineConfig"
    followers: list[subprocess.Popen]

    def close(self, timeout: float = 30.0) -> None:
        self.tp.shutdown()
        for p in self.followers:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_group(config: "Config") -> Group:
    """Join (or, with ``--rank -1``, start on this machine) the tensor-parallel group of
    ``config.engine.tensor_parallel_size`` ranks. Each rank gets cores / N CPU threads unless
    ``--num-threads`` says otherwise; on CUDA rank r takes device r (modulo the devices)."""
    from shared.config import ConfigError, to_argv

    engine, process = config.engine, config.process
    world = engine.tensor_parallel_size
    if process.rank >= world:
        raise ConfigError(f"--rank {process.rank} is not below --tensor-parallel-size {world}")
    if process.rank >= 0 and not process.dist_init:
        raise ConfigError("--rank needs --dist-init tcp://HOST:PORT (rank 0's address)")
    from services.executor.weights import load_model_config
    from shared.model_path import resolve_model

    local_shape(load_model_config(resolve_model(engine.model)), world)    # refuse before a rank starts
    from services.launcher import cpu_share

    threads = process.num_threads or cpu_share(world)
    torch.set_num_threads(threads)
    rank, init, followers = process.rank, process.dist_init, []
    if rank < 0:
        init = init or free_tcp_address()
        argv = to_argv(replace(config, process=replace(process, num_threads=threads)), "executor")
        followers = spawn_followers(argv, world, init)
        rank = 0
    device = torch.device("cpu")
    if engine.device.startswith("cuda") or (engine.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", rank % torch.cuda.device_count())
        engine = replace(engine, device=str(device))
    try:
        tp = TensorParallel.join(rank, world, init, device, float(os.environ.get(TIMEOUT_ENV, 600)))
    except BaseException:
        for p in followers:
            p.kill()
        raise
    log.info("rank %d of %d (%s, %s), %d CPU threads", rank, world, dist.get_backend(), init, threads)
    return Group(tp, engine, followers)


def follow(worker) -> int:
    """Ranks 1..N-1: do what rank 0 broadcasts: b"P" + a plan (run it), b"F" (forget every
    sequence), b"" (shutdown)."""
    from shared.messages import decode

    while True:
        data = worker.tp.broadcast_bytes(None)
        if not data:
            log.info("rank %d: shutdown", worker.tp.rank)
            return 0
        if data == b"F":
            worker.forget()
        else:
            worker.execute(decode(data[1:]))

