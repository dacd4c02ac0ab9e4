"""Typed wire messages for every channel, and the one codec that moves them.

Channels (see docs/ARCHITECTURE.md):
  gateway  -> scheduler : AddRequest, AbortRequest, StatsRequest
  scheduler -> gateway  : RequestOutputs, RequestError, SchedulerStats
  scheduler -> executor : ExecutorHello, StepPlan, StepMasks, Shutdown
  executor -> scheduler : ExecutorReady, StepResult, ExecutorError

Every frame is one msgpack map tagged by ``type`` and stamped with ``version``. Decoding validates
the shape and value ranges (msgspec), rejects unknown tags and versions, and never unpickles.
Hot-path structs (plan and result entries) are ``array_like`` so a 256-sequence decode plan stays
a few KB.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION = 1

NonNegInt = Annotated[int, Meta(ge=0)]
PosInt = Annotated[int, Meta(ge=1)]
FinishReason = Literal["stop", "length", "abort"]
MAX_CACHE_SALT_CHARS = 256     # AddRequest.cache_salt; the gateway's schema has the same bound
CacheSalt = Annotated[str, Meta(min_length=1, max_length=MAX_CACHE_SALT_CHARS)]


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


# --------------------------------------------------------------------------------------------
# Sampling parameters (travel gateway -> scheduler -> executor)


class SamplingParams(Struct, kw_only=True, omit_defaults=True):
    n: Annotated[int, Meta(ge=1, le=64)] = 1
    max_tokens: Annotated[int, Meta(ge=1)] = 16
    min_tokens: NonNegInt = 0
    temperature: Annotated[float, Meta(ge=0.0, le=10.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = -1          # -1 or 0 = off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    seed: Optional[int] = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    stop_token_ids: list[NonNegInt] = []
    ignore_eos: bool = False
    logprobs: Optional[Annotated[int, Meta(ge=0, le=20)]] = None   # top-k logprobs of sampled tokens
    logit_bias: dict[NonNegInt, Annotated[float, Meta(ge=-100.0, le=100.0)]] = {}   # token id -> added to its logit
    # Beam search (HF generate's num_beams=n, num_return_sequences=n, do_sample=False): the n
    # outputs are the best n hypotheses, best first, sent when the search ends
    use_beam_search: bool = False
    length_penalty: float = 1.0            # a hypothesis scores sum(logprobs) / len ** length_penalty
    early_stopping: bool = False           # True: stop once n hypotheses are finished

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


class GrammarSpec(Struct, array_like=True, frozen=True):
    """A structured-output constraint (gateway -> scheduler). ``value``: the JSON Schema text
    (json_schema), ignored (json_object: any JSON object), a regular expression (regex), a JSON
    list of the allowed strings (choice), a Lark grammar (lark). shared/grammar.py turns it
    into llguidance's grammar; the scheduler compiles it once per distinct spec (bounded cache)."""

    kind: GrammarKind
    value: str = ""


# --------------------------------------------------------------------------------------------
# Base class


class Message(Struct, tag_field="type", kw_only=True):
    version: int = PROTOCOL_VERSION


# --------------------------------------------------------------------------------------------
# gateway -> scheduler


class AddRequest(Message, tag="add"):
    request_id: str
    prompt_token_ids: list[NonNegInt]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    grammar: Optional[GrammarSpec] = None    # structured output: every sample is constrained by it
    # prefix-cache isolation (vLLM's name): enters the digest of the prompt's first block, so
    # only requests with the same salt share cached KV blocks; None shares with unsalted ones
    cache_salt: Optional[CacheSalt] = None


class AbortRequest(Message, tag="abort"):
    """Stop a whole request, or with ``sample_index`` one sample of an n > 1 request (the others
    go on). The field defaults to None, so frames without it mean the whole request, as before."""

    request_id: str
    sample_index: Optional[NonNegInt] = None


class StatsRequest(Message, tag="stats_request"):
    """Ask the scheduler for a SchedulerStats reply (the gateway's /metrics and /health)."""


# --------------------------------------------------------------------------------------------
# scheduler -> gateway


class TokenLogprobs(Struct, array_like=True):
    """Logprob of a sampled token and the top-k alternatives at that position."""

    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class RequestOutput(Struct, array_like=True, omit_defaults=True):
    request_id: str
    index: int                          # sample index in 0..n-1
    token_ids: list[int]                # new tokens since the last output
    finish_reason: Optional[FinishReason] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    logprobs: Optional[list[TokenLogprobs]] = None
    cumulative_logprob: Optional[float] = None     # beam search: the hypothesis' sum of logprobs


class RequestOutputs(Message, tag="outputs"):
    outputs: list[RequestOutput]


class RequestError(Message, tag="request_error"):
    request_id: str
    code: Literal["queue_full", "too_long", "invalid", "executor_error", "not_ready"]
    message: str


class HistogramCounts(Struct, array_like=True):
    """A histogram as Prometheus exposes it: upper bounds, cumulative counts (one per bound, then
    +Inf: the total count) and the sum of observed values."""

    bounds: list[float]
    counts: list[NonNegInt]
    sum: float

    def __post_init__(self):
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.bounds)} bounds need {len(self.bounds) + 1} counts, got {len(self.counts)}")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds)):
            raise ValueError("histogram bounds must increase")
        if any(b < a for a, b in zip(self.counts, self.counts[1:])):
            raise ValueError("cumulative histogram counts must not decrease")


class SchedulerStats(Message, tag="stats"):
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_cache_usage: float = 0.0                # fraction of blocks in use
    prefix_cache_queries: int = 0              # tokens looked up
    prefix_cache_hits: int = 0                 # tokens found
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    executor_ready: bool = False
    max_model_len: int = 0                     # the engine's context limit, once the executor is ready
    block_size: int = 0
    # paging at work (docs/OPERATIONS.md); totals since the scheduler started
    prefix_cache_evictions: int = 0            # cached free blocks taken back for new data
    recomputed_tokens: int = 0                 # tokens computed again (recompute preemption, executor restart)
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    repeat_preemptions: int = 0                # preemptions of a sequence preempted before
    # scheduler-clock histograms (monotonic seconds; tokens per step)
    e2e_time: Optional[HistogramCounts] = None         # arrival -> last sample finished
    queue_time: Optional[HistogramCounts] = None       # arrival -> first scheduled
    prefill_time: Optional[HistogramCounts] = None     # first scheduled -> first token
    decode_time: Optional[HistogramCounts] = None      # first token -> last sample finished
    tokens_per_step: Optional[HistogramCounts] = None


# --------------------------------------------------------------------------------------------
# scheduler -> executor


class ExecutorHello(Message, tag="hello"):
    block_size: PosInt


class NewSeq(Struct, array_like=True):
    """A sequence the executor has not seen (first schedule, or resume after recompute)."""

    seq_id: NonNegInt
    prompt_token_ids: list[NonNegInt]
    output_token_ids: list[NonNegInt]    # non-empty when resuming after a recompute preemption
    block_ids: list[NonNegInt]
    num_computed: NonNegInt              # tokens already in the cache (prefix hit)
    num_new_tokens: NonNegInt            # tokens to compute this step
    sampling: SamplingParams
    sample_index: NonNegInt = 0          # which of the request's n samples (keys its seeded stream)


class TableUpdate(Struct, array_like=True):
    """``table[start:] = block_ids`` for a known sequence (truncate, then extend).

    Appending a block: ``start == len(table)``. Copy-on-write of the last block:
    ``start == len(table) - 1``. Swap in: ``start == 0`` with the whole new table.
    """

    seq_id: NonNegInt
    start: NonNegInt
    block_ids: list[NonNegInt]


class Fork(Struct, array_like=True):
    """After the forward pass, ``child`` becomes a copy of ``parent`` (tokens and block table)
    and samples its own token from the parent's logits. Used for n > 1 (and beam search)."""

    parent: NonNegInt
    child: NonNegInt
    sample_index: NonNegInt


class StepPlan(Message, tag="plan"):
    """One step, as a diff against what the executor already holds.

    Order of application on the executor: drop ``finished`` and ``preempted``; ``swap_out``;
    ``swap_in``; ``copies``; register ``new``; apply ``table_updates``; ``appends``; forward pass over the
    new sequences and ``run_seq_ids`` (``run_num_tokens[i]`` tokens each); ``forks``; sample.
    Known sequences are columnar (two int lists) so a 256-sequence decode step is ~1 KB.
    """

    step_id: NonNegInt
    new: list[NewSeq] = []
    run_seq_ids: list[NonNegInt] = []
    run_num_tokens: list[NonNegInt] = []
    table_updates: list[TableUpdate] = []
    forks: list[Fork] = []
    copies: list[tuple[NonNegInt, NonNegInt]] = []      # (src, dst) device blocks, before the forward
    swap_out: list[tuple[NonNegInt, NonNegInt]] = []    # (device_block, host_block)
    swap_in: list[tuple[NonNegInt, NonNegInt]] = []     # (host_block, device_block)
    finished: list[NonNegInt] = []                      # seq ids whose executor state can be dropped
    preempted: list[NonNegInt] = []                     # recompute-preempted: drop state too
    # Structured outputs: these sampling seqs (fork children included) sample only tokens their
    # grammar allows. ``masks`` holds one row per id, ceil(vocab_size / 32) little-endian int32
    # words each; bit t % 32 of word t // 32 set = token t allowed. Empty while ``mask_seq_ids``
    # is not: the masks follow in a StepMasks frame (computed while the forward pass runs).
    mask_seq_ids: list[NonNegInt] = []
    masks: bytes = b""
    # Beam search: (seq id, token) appended to a known sequence before the forward pass: the
    # token the scheduler chose for that beam (the executor never appends to beam sequences).
    appends: list[tuple[NonNegInt, NonNegInt]] = []


class StepMasks(Message, tag="masks"):
    """The token masks of step ``step_id`` when its plan was sent without them; the executor
    needs them only after the forward pass, so the scheduler computes them meanwhile."""

    step_id: NonNegInt
    masks: bytes


class Shutdown(Message, tag="shutdown"):
    pass


# --------------------------------------------------------------------------------------------
# executor -> scheduler


class ExecutorReady(Message, tag="ready"):
    """The executor's handshake: every limit it enforces (``shared.config.resolve_with_executor``
    merges them into the scheduler's config). A 0 batch or sequence cap is none enforced."""

    model: str
    block_size: PosInt
    num_blocks: PosInt
    num_host_blocks: NonNegInt
    max_model_len: PosInt
    vocab_size: PosInt
    eos_token_ids: list[int]
    device: str = "cpu"
    max_num_batched_tokens: NonNegInt = 0
    max_num_seqs: NonNegInt = 0
    # W when every layer attends only to keys p - W < k <= p (Mistral), else 0 (some global layer):
    # the scheduler then frees the blocks that left the window (block_manager.py)
    sliding_window: NonNegInt = 0


class StepResult(Message, tag="result"):
    """``token_ids[i]`` was sampled for ``seq_ids[i]``; only sequences whose known tokens are all
    computed after this step sample (a prefill chunk that ends mid-prompt does not)."""

    step_id: NonNegInt
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: Optional[list[Optional[TokenLogprobs]]] = None


class ExecutorError(Message, tag="executor_error"):
    step_id: int
    message: str


# --------------------------------------------------------------------------------------------
# Codec

AnyMessage = Union[
    AddRequest, AbortRequest, StatsRequest,
    RequestOutputs, RequestError, SchedulerStats,
    ExecutorHello, StepPlan, StepMasks, Shutdown,
    ExecutorReady, StepResult, ExecutorError,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


class _Envelope(Struct):
    version: int = -1
    type: str = "?"


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def decode(frame: bytes | memoryview) -> AnyMessage:
    """Decode and validate one frame; raise ProtocolError with a readable reason otherwise (and
    only ProtocolError: msgspec raises UnicodeDecodeError for a string that is not UTF-8)."""
    try:
        msg = _decoder.decode(frame)
    except msgspec.ValidationError as e:
        try:
            env = _envelope_decoder.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
            env = None
        if env is not None and env.version != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {env.version} "
                                f"(this side speaks {PROTOCOL_VERSION})") from None
        raise ProtocolError(f"invalid message: {e}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed frame: {e}") from None
    if msg.version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {msg.version} (this side speaks {PROTOCOL_VERSION})")
    return msg
