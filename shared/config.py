"""Configuration shared by the services, defined once. Plain dataclasses: no torch, no I/O.

Every field of the dataclasses below that is a command-line option carries an ``Option`` in its
metadata: help, parser, choices and the processes that read it (``uses``). Every command's flags
are generated from that one definition (``add_options``) and read back by ``config_from_args``;
``pagedserve serve`` hands each child the argv ``to_argv`` generates from the same config, so a
child sees every option its service uses, with the value serve was given.

Options whose executor-side value is a limit (block size, blocks, host blocks, max_model_len,
batched tokens, sequences) are merged with the executor's handshake by ``resolve_with_executor``,
the one rule used by the scheduler service and the offline engine alike: 0 takes the executor's
value, a value the executor does not honour is a ConfigError naming both.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Optional

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "cuda")
ROUTING_POLICIES = ("prefix", "least-loaded", "round-robin")   # services/gateway/routing.py
DTYPES = ("auto", "float32", "float16", "bfloat16")
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
LOG_LEVELS = ("debug", "info", "warning", "error")
TOOL_CALL_PARSERS = ("auto", "hermes", "smollm2")   # services/gateway/tools.py has each but auto
SERVICES = ("executor", "scheduler", "gateway")   # the processes `serve` starts, in start order
COMMANDS = (*SERVICES, "generate", "serve", "compare")   # compare: `bench compare`
DEFAULT_MAX_MODEL_LEN = 2048                       # the executor's context limit when none is set


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


# ------------------------------------------------------------------------------ argparse types


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def float_where(holds: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """A float for which ``holds(value)`` is true (NaN never is), else an error stating ``rule``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not holds(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value
    return parse


def port(text: str) -> int:
    value = int_at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {value}")
    return value


def check_address(addr: str) -> str:
    """Reject addresses ZeroMQ would choke on, with a message naming the flag's value."""
    if not addr.startswith(("ipc://", "tcp://", "inproc://")):
        raise ValueError(f"address must start with ipc://, tcp:// or inproc://, got {addr!r}")
    return addr


def address(text: str) -> str:
    try:
        return check_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


fraction = float_where(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
positive = float_where(lambda v: v > 0, "must be > 0")
non_negative = float_where(lambda v: v >= 0, "must be >= 0")
utilization = float_where(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")


# ------------------------------------------------------------------------------ the option table


@dataclass(frozen=True)
class Option:
    help: str
    uses: frozenset[str]                  # the commands that read it (serve: see ``options_of``)
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[tuple] = None
    by_serve: bool = False                # set by serve for each child (addresses), not a serve flag
    positional_in: tuple[str, ...] = ()   # commands taking it as a positional argument
    env: Optional[str] = None             # environment variable that sets the default
    repeat: bool = False                  # a list: the flag is repeated
    aliases: tuple[str, ...] = ()         # other spellings of the flag (another engine's name for it)


def opt(default, help: str, uses: str, **kw) -> Any:
    """A dataclass field that is a command-line option; ``uses`` is a space-separated list."""
    meta = {"option": Option(help, frozenset(uses.split()), **kw)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


ENGINE = "executor scheduler generate"          # the engine's limits: both halves and the offline engine


@dataclass
class CacheConfig:
    """Paged KV memory, as the scheduler sees it: block ids only, never tensors."""

    block_size: int = opt(16, "tokens per KV block", ENGINE, type=int, choices=BLOCK_SIZES)
    num_blocks: int = opt(0, "device KV blocks (0 = the executor sizes them from its memory budget)", ENGINE,
                          type=int_at_least(0))
    num_host_blocks: int = opt(0, "CPU swap pool blocks (0 = the executor's: a quarter of the device "
                                  "blocks)", ENGINE, type=int_at_least(0))
    watermark: float = opt(0.01, "fraction of blocks kept free at admission for running sequences to grow",
                           "scheduler generate", type=fraction)
    enable_prefix_caching: bool = opt(True, "reuse the KV blocks of shared prompt prefixes", "scheduler generate")
    # Not an option: the model's. W > 0 when every layer attends only to the last W positions
    # (p - W < k <= p); taken from the executor's handshake (``resolve_with_executor``).
    sliding_window: int = 0

    def validate(self) -> "CacheConfig":
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"block_size must be a power of two in 1..128, got {self.block_size}")
        if self.num_blocks < 0 or self.num_host_blocks < 0:
            raise ConfigError("num_blocks and num_host_blocks must be >= 0")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.sliding_window < 0:
            raise ConfigError(f"sliding_window must be >= 0, got {self.sliding_window}")
        return self


@dataclass
class SchedulerConfig:
    """Batching and admission policy. ``max_model_len`` and ``max_num_batched_tokens`` may be 0
    on the command line: the executor's (``resolve_with_executor``)."""

    max_num_seqs: int = opt(256, "most sequences in one step", ENGINE, type=int_at_least(1))
    max_num_batched_tokens: int = opt(2048, "most tokens in one step (0 = the executor's)", ENGINE,
                                      type=int_at_least(0))
    max_model_len: int = opt(0, "context limit, prompt + output (0 = the executor's: the model's own, at "
                                f"most {DEFAULT_MAX_MODEL_LEN})", ENGINE + " gateway", type=int_at_least(0))
    max_waiting: int = opt(1024, "waiting-queue bound; beyond it requests get queue_full", "scheduler",
                           type=int_at_least(1))
    preemption_mode: str = opt("recompute", "what preemption does with a sequence's KV blocks",
                               "scheduler generate", choices=("recompute", "swap"))
    enable_chunked_prefill: bool = opt(True, "split long prompts over several steps", "scheduler generate")
    grammar_cache_size: int = opt(256, "compiled structured-output grammars kept (LRU); a bound, so "
                                       "clients cannot fill memory with distinct schemas", "scheduler generate",
                                  type=int_at_least(1))

    def validate(self) -> "SchedulerConfig":
        for name in ("max_num_seqs", "max_waiting", "grammar_cache_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_num_batched_tokens", "max_model_len"):   # 0 = the executor's
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if not self.enable_chunked_prefill and 0 < self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        return self


@dataclass
class EngineConfig:
    """Everything one engine (scheduler + executor) needs."""

    model: str = opt("", "HF folder, .gguf file, random:<preset>, or '' for the bundled SmolLM2-135M-Instruct "
                         "(the gateway and the scheduler load its tokenizer)",
                     "executor scheduler gateway generate compare",
                     positional_in=("serve",))
    dtype: str = opt("auto", "auto = bfloat16 on CUDA, float32 on CPU", "executor generate compare",
                     choices=DTYPES)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N (auto = cuda if available)", "executor generate compare")
    attention_backend: str = opt("auto", "auto = cuda on a GPU, else cpu", "executor generate compare",
                                 choices=ATTENTION_BACKENDS)
    gpu_memory_utilization: float = opt(0.9, "fraction of GPU memory the executor may fill", "executor generate",
                                        type=utilization)
    kv_cache_memory: int = opt(0, "bytes for the KV cache (0 = derive)", "executor generate", type=int_at_least(0))
    seed: int = opt(0, "seed of random:<preset> weights", "executor compare", type=int)
    tensor_parallel_size: int = opt(1, "executor ranks the model is split over (attention heads, MLP, vocab; "
                                       "the world size of a torch.distributed group: gloo on CPU, NCCL on CUDA)",
                                    "executor generate", type=int_at_least(1), aliases=("--world-size",))
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def validate(self) -> "EngineConfig":
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        self.cache.validate()
        self.scheduler.validate()
        return self


@dataclass
class GatewayConfig:
    """The HTTP front door."""

    scheduler_addr: list[str] = opt([], "scheduler ROUTER address (ipc://… or tcp://…); repeat to front "
                                        "several", "gateway", by_serve=True, repeat=True)
    host: str = opt("127.0.0.1", "HTTP bind address", "gateway")
    port: int = opt(8000, "HTTP port", "gateway", type=port)
    served_model_name: str = opt("", "name clients pass as `model` ('' = the model's)", "gateway")
    api_key: str = opt("", "require `Authorization: Bearer KEY` on every route but /health", "gateway",
                       env="PAGEDSERVE_API_KEY")
    max_body_bytes: int = opt(4 * 1024 * 1024, "larger request bodies get 413", "gateway", type=int_at_least(1))
    max_header_bytes: int = opt(16 * 1024, "larger request lines + headers get 431", "gateway",
                                type=int_at_least(1))
    max_n: int = opt(16, "most samples per request (n)", "gateway", type=int_at_least(1))
    tool_call_parser: str = opt("auto", "how tool_choice=auto reads tool calls in the model's text "
                                        "(auto = smollm2 for SmolLM2, else hermes)", "gateway",
                                choices=TOOL_CALL_PARSERS)
    limit_concurrency: int = opt(0, "most open connections before uvicorn answers 503 (0 = no limit)", "gateway",
                                 type=int_at_least(0))
    drain_timeout: float = opt(30.0, "on SIGTERM, seconds in-flight requests get to finish", "gateway serve",
                               type=non_negative)
    prefix_cache_salt_required: bool = opt(False, "reject (400) a request without `cache_salt`: tenants never "
                                                  "share prefix-cache blocks unless they share a salt", "gateway")
    routing: str = opt("prefix", "which of several schedulers a new request goes to: prefix (the one sent its "
                                 "prompt's longest prefix, unless much busier; else the least loaded), "
                                 "least-loaded, or round-robin", "gateway", choices=ROUTING_POLICIES)


@dataclass
class ProcessConfig:
    """How the service processes find each other and behave as processes."""

    addr: str = opt("", "the executor's ROUTER bind address (default: ipc:// in a private temp dir)", "executor",
                    by_serve=True)
    gateway_addr: str = opt("tcp://127.0.0.1:5557", "ROUTER address the gateways connect to (bound here)",
                            "scheduler", type=address, by_serve=True)
    executor_addr: str = opt("tcp://127.0.0.1:5558", "the executor's ROUTER address (connected to)", "scheduler",
                             type=address, by_serve=True)
    shutdown_executor: bool = opt(False, "send Shutdown to the executor on exit (when this process owns it)",
                                  "scheduler", by_serve=True)
    hello_interval: float = opt(1.0, "seconds between handshake attempts while the executor loads", "scheduler",
                                type=positive)
    step_timeout: float = opt(300.0, "seconds to wait for one step's result before declaring the executor lost "
                                     "(a dropped connection is noticed at once)", "scheduler", type=positive)
    recovery_timeout: float = opt(300.0, "seconds to wait for a new executor after losing one before failing "
                                         "all requests", "scheduler", type=positive)
    log_level: str = opt("info", "logging level", "executor scheduler gateway", type=str.lower,
                         choices=LOG_LEVELS)
    ready_timeout: float = opt(600.0, "seconds to wait for the weights to load", "serve", type=positive)
    max_restarts: int = opt(5, "restarts of a crashed executor or scheduler before giving up", "serve",
                            type=int_at_least(0))
    data_parallel_size: int = opt(1, "engines (a scheduler and its executor each, own KV cache and prefix "
                                     "cache) behind the one gateway", "serve", type=int_at_least(1))
    rank: int = opt(-1, "this executor's rank in its tensor-parallel group (-1: rank 0, which starts ranks "
                        "1..N-1 on this machine; 0..N-1: one rank of a group started by hand, e.g. across "
                        "machines)", "executor", type=int_at_least(-1), by_serve=True)
    dist_init: str = opt("", "the group's rendezvous, tcp://HOST:PORT where rank 0 listens ('' with --rank -1: "
                             "a free local port)", "executor", by_serve=True)
    num_threads: int = opt(0, "CPU threads of the executor's torch and C kernels (0 = torch's default; cores / N "
                              "with --data-parallel-size or --tensor-parallel-size N)", "executor",
                           type=int_at_least(0))


@dataclass
class Config:
    """Every option of every command; a command reads the ones ``options_of`` gives it."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)


# ------------------------------------------------------------------------------ generated CLI


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]      # attribute path in Config, e.g. ("engine", "cache", "block_size")
    default: Any
    option: Option

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def all_flags(cls=Config, path: tuple[str, ...] = ()) -> Iterator[Flag]:
    """Every option, depth first through the nested config dataclasses."""
    for f in fields(cls):
        if "option" in f.metadata:
            default = f.default if f.default_factory is MISSING else f.default_factory()
            yield Flag(path + (f.name,), default, f.metadata["option"])
        elif f.type in _NESTED:                 # annotations are strings (from __future__)
            yield from all_flags(_NESTED[f.type], path + (f.name,))


_NESTED = {c.__name__: c for c in (CacheConfig, SchedulerConfig, EngineConfig, GatewayConfig, ProcessConfig)}


def options_of(command: str) -> list[Flag]:
    """The options a command takes. `serve` takes every option of the services it starts (less
    the addresses it picks itself) and its own."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    if command == "serve":
        return [f for f in all_flags() if not f.option.by_serve and f.option.uses & {"serve", *SERVICES}]
    return [f for f in all_flags() if command in f.option.uses]


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    for f in options_of(command):
        o = f.option
        default = os.environ.get(o.env, f.default) if o.env else f.default
        kw: dict[str, Any] = dict(default=default, help=o.help)
        if o.choices:
            kw["choices"] = o.choices
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif o.repeat:
            kw.update(action="append", metavar=f.name.upper().split("_")[-1], default=None,
                      required=not f.default)
        elif o.type is not None:
            kw["type"] = o.type
        if o.env is None and default not in ("", []):      # never show a secret from the environment
            kw["help"] += " (default: %(default)s)"
        if command in o.positional_in:
            parser.add_argument(f.name, nargs="?", **kw)
        else:
            parser.add_argument(f.flag, *o.aliases, **kw)


def _lookup(config, path: tuple[str, ...]):
    for name in path:
        config = getattr(config, name)
    return config


def config_from_args(args: argparse.Namespace, command: str) -> Config:
    """The Config a command's parsed flags describe (options it does not take keep their default).
    Raises ConfigError for values that are wrong together."""
    config = Config()
    for f in options_of(command):
        setattr(_lookup(config, f.path[:-1]), f.name, getattr(args, f.name))
    config.engine.validate()
    return config


def to_argv(config: Config, command: str, secrets_in_env: bool = False) -> list[str]:
    """The flags that make ``command``'s parser produce ``config`` again (positional first).
    ``secrets_in_env``: leave out the options read from an environment variable (the API key):
    the caller passes them in the child's environment (``env_of``), where ``ps`` does not show them."""
    head, argv = [], []
    for f in options_of(command):
        value = _lookup(config, f.path)
        if secrets_in_env and f.option.env:
            continue
        if command in f.option.positional_in:
            head.append(str(value))
        elif isinstance(value, bool):
            argv.append(f.flag if value else "--no-" + f.flag[2:])
        elif f.option.repeat:
            for v in value:
                argv += [f.flag, str(v)]
        else:
            argv += [f.flag, str(value)]
    return head + argv


def env_of(config: Config, command: str) -> dict[str, str]:
    """The environment variables that carry ``command``'s env-backed options (see ``to_argv``)."""
    return {f.option.env: str(_lookup(config, f.path)) for f in options_of(command) if f.option.env}


# ------------------------------------------------------------------------------ the handshake merge


def resolve_with_executor(sched: SchedulerConfig, cache: CacheConfig, ready) -> tuple[SchedulerConfig, CacheConfig]:
    """The scheduler's configs with the executor's limits (``ready``: an ExecutorReady) taken in.

    One rule for every limit: 0 takes the executor's value; a value larger than the executor
    enforces is a ConfigError naming both (``--max-num-batched-tokens 4096 but the executor
    enforces 2048``), as is a different block size. A smaller one is the scheduler's own, stricter
    limit. A limit the executor reports as 0 (the fake executor's batch and sequence caps) is not
    enforced there. ``max_model_len`` follows the same rule: a longer context than the executor
    (whose own is capped by the model) is an error, never clamped. The sliding window is not a
    limit but a property of the model: always the executor's."""
    if ready.block_size != cache.block_size:
        raise ConfigError(f"--block-size {cache.block_size} but the executor uses {ready.block_size}")

    def merged(flag: str, mine: int, theirs: int, zero_is_no_limit: bool = False) -> int:
        if mine > theirs and not (zero_is_no_limit and theirs == 0):
            raise ConfigError(f"--{flag} {mine} but the executor enforces {theirs}")
        return mine or theirs

    cache = replace(cache, num_blocks=merged("num-blocks", cache.num_blocks, ready.num_blocks),
                    num_host_blocks=merged("num-host-blocks", cache.num_host_blocks, ready.num_host_blocks),
                    sliding_window=ready.sliding_window)
    sched = replace(sched,
                    max_model_len=merged("max-model-len", sched.max_model_len, ready.max_model_len),
                    max_num_batched_tokens=merged("max-num-batched-tokens", sched.max_num_batched_tokens,
                                                  ready.max_num_batched_tokens, zero_is_no_limit=True),
                    max_num_seqs=merged("max-num-seqs", sched.max_num_seqs, ready.max_num_seqs,
                                        zero_is_no_limit=True))
    if sched.max_num_batched_tokens == 0:
        raise ConfigError("--max-num-batched-tokens 0 but the executor reports no limit to take")
    return sched.validate(), cache.validate()
