"""OpenAI API request and response models (msgspec Structs, validated on decode).

A field no API defines is ignored with a logged warning (clients send extras through
``extra_body``, as with vLLM); a field OpenAI or vLLM defines that pagedserve does not implement
is a 400 naming it (``NOT_IMPLEMENTED``), never accepted and ignored. Known fields are
range-checked here so a bad value is a 400 naming the parameter, never a scheduler error. The
static limits below are part of the schema (and so of /openapi.json); limits that depend on the
served model (vocabulary, context, KV blocks) and ``--max-n`` are checked by the server.
"""
from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct

from shared.messages import CacheSalt, SamplingParams

log = logging.getLogger("pagedserve.gateway")

MAX_STOP_STRINGS = 16          # stop strings per request
MAX_STOP_STRING_CHARS = 256    # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300           # logit_bias entries (OpenAI's limit)
LOGIT_BIAS_RANGE = 100.0       # each bias in [-100, 100]
MAX_N = 64                     # the wire limit (SamplingParams.n); the gateway's --max-n is lower
MAX_BEAM_WIDTH = 10            # the scheduler keeps 2n candidates per beam (one EOS id), at most 20

Temperature = Annotated[float, Meta(ge=0.0, le=10.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
TokenId = Annotated[int, Meta(ge=0)]
StopString = Annotated[str, Meta(max_length=MAX_STOP_STRING_CHARS)]
StopStrings = Union[StopString, Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)], None]
LogitBias = Annotated[dict[TokenId, Annotated[float, Meta(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]],
                      Meta(max_length=MAX_LOGIT_BIAS)]


class StreamOptions(Struct):
    include_usage: bool = False


class JsonSchemaFormat(Struct):
    name: str = "response"
    schema: Optional[Union[dict, bool]] = None
    description: Optional[str] = None
    strict: Optional[bool] = None


class ResponseFormat(Struct):
    """OpenAI's ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(Struct):
    """vLLM's ``structured_outputs`` (extra body): exactly one constraint."""

    json: Optional[Union[dict, bool, str]] = None       # a JSON Schema (object, or its JSON text)
    regex: Optional[str] = None
    choice: Optional[Annotated[list[str], Meta(min_length=1)]] = None
    grammar: Optional[str] = None                       # Lark / EBNF (GBNF is converted)
    json_object: Optional[bool] = None
    disable_fallback: bool = False                      # there is one backend: never falls back
    disable_any_whitespace: Optional[bool] = None       # JSON is always compact here (True)
    disable_additional_properties: Optional[bool] = None
    whitespace_pattern: Optional[str] = None
    structural_tag: Optional[str] = None


class _SamplingFields(Struct, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names, plus vLLM's extras)."""

    model: Optional[str] = None
    max_tokens: Optional[MaxTokens] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[Annotated[float, Meta(gt=0.0, le=1.0)]] = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: StopStrings = None
    seed: Optional[int] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    logit_bias: Optional[LogitBias] = None     # token id -> bias added to its logit (ids checked against the vocabulary)
    # extras (vLLM-compatible names)
    top_k: Optional[Annotated[int, Meta(ge=-1)]] = None
    min_p: Optional[Annotated[float, Meta(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Meta(gt=0.0, le=10.0)]] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)]] = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    # prefix-cache isolation: only requests with the same salt share cached KV blocks
    cache_salt: Optional[CacheSalt] = None
    # beam search (vLLM's extras): n is the beam width; the n choices are the hypotheses, best first
    use_beam_search: bool = False
    length_penalty: Optional[Annotated[float, Meta(ge=-10.0, le=10.0)]] = None
    early_stopping: Optional[bool] = None

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def token_id_fields(self) -> dict[str, list[int]]:
        """Token ids given by the client outside the prompt, by parameter name (vocabulary check)."""
        return {"stop_token_ids": self.stop_token_ids or [], "logit_bias": list(self.logit_bias or ())}

    def requested_logprobs(self) -> Optional[int]:
        return None

    def beam_conflicts(self) -> list[str]:
        """The parameters given that make no sense with beam search (greedy over beams, whole
        hypotheses at the end), by name; the endpoint adds its own (logprobs, tools)."""
        given = {"stream": self.stream, "temperature": (self.temperature or 0) > 0,
                 "top_p": self.top_p not in (None, 1.0), "top_k": self.top_k not in (None, -1, 0),
                 "min_p": bool(self.min_p), "presence_penalty": bool(self.presence_penalty),
                 "frequency_penalty": bool(self.frequency_penalty),
                 "repetition_penalty": self.repetition_penalty not in (None, 1.0), "seed": self.seed is not None,
                 "logit_bias": bool(self.logit_bias), "min_tokens": self.min_tokens > 0,
                 "ignore_eos": self.ignore_eos, "stop": bool(self.stop_strings),
                 "stop_token_ids": bool(self.stop_token_ids), "response_format": self.response_format is not None
                 and self.response_format.type != "text", "structured_outputs": self.structured_outputs is not None,
                 "logprobs": self.requested_logprobs() is not None}
        return [name for name, on in given.items() if on]

    def check_beam_search(self) -> None:
        """InvalidRequest naming the first parameter that does not fit beam search (or beam
        search's options given without it)."""
        if not self.use_beam_search:
            for name in ("length_penalty", "early_stopping"):
                if getattr(self, name) is not None:
                    raise InvalidRequest(f"{name} applies to beam search only (set use_beam_search)", param=name)
            return
        if self.n > MAX_BEAM_WIDTH:
            raise InvalidRequest(f"beam search takes at most n={MAX_BEAM_WIDTH} beams, got {self.n}", param="n")
        conflicts = self.beam_conflicts()
        if conflicts:
            what = "streaming" if conflicts[0] == "stream" else conflicts[0]
            raise InvalidRequest(f"use_beam_search does not take {what} (beam search is greedy over n beams and "
                                 "returns the n best hypotheses when it ends)", param=conflicts[0])

    def to_sampling(self, max_tokens: int) -> SamplingParams:
        """Map to the wire SamplingParams; ``None`` fields keep the engine defaults."""
        if self.use_beam_search:            # greedy over beams: only the search's own options
            return SamplingParams(n=self.n, max_tokens=max_tokens, temperature=0.0, use_beam_search=True,
                                  length_penalty=1.0 if self.length_penalty is None else self.length_penalty,
                                  early_stopping=bool(self.early_stopping))
        kw = dict(n=self.n, max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens),
                  seed=self.seed, ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids or [],
                  logprobs=self.requested_logprobs(), logit_bias=self.logit_bias or {})
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        return SamplingParams(**kw)


class ContentPart(Struct):
    type: str
    text: Optional[str] = None


class FunctionCall(Struct):
    name: str
    arguments: str                      # JSON text, as OpenAI sends and returns it


class ToolCallIn(Struct):
    """A tool call of an earlier assistant turn, sent back by the client."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class FunctionDef(Struct):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None   # JSON Schema of the arguments
    strict: Optional[bool] = None       # arguments always follow the schema when constrained


class Tool(Struct):
    type: str
    function: FunctionDef


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ChatMessage(Struct):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None       # assistant turns
    tool_call_id: Optional[str] = None                  # tool turns

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
            parts.append(part.text)
        return "".join(parts)

    def as_template_input(self) -> dict:
        """The message in OpenAI's shape as plain data (tools.prepare_messages readies it for a
        chat template)."""
        out: dict = {"role": self.role, "content": self.text()}
        if self.name:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            out["tool_calls"] = msgspec.to_builtins(self.tool_calls)
        return out


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: Optional[MaxTokens] = None
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, Meta(ge=0, le=20)]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict] = None
    tools: Optional[Annotated[list[Tool], Meta(max_length=128)]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: bool = True

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def beam_conflicts(self) -> list[str]:
        return super().beam_conflicts() + (["top_logprobs"] if self.top_logprobs else [])


TokenIds = list[TokenId]


class CompletionRequest(_SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]] (msgspec allows one array type per union)
    prompt: Union[str, Annotated[list[Union[str, TokenId, TokenIds]], Meta(min_length=1)]]
    logprobs: Optional[Annotated[int, Meta(ge=0, le=20)]] = None
    echo: bool = False

    def requested_logprobs(self) -> Optional[int]:
        return self.logprobs

    def single_prompt(self) -> Union[str, list[int]]:
        """The one prompt of this request (a list of one prompt is accepted too)."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if all(isinstance(x, int) for x in p):
            return p
        if len(p) != 1 or isinstance(p[0], int):
            raise InvalidRequest("prompt must be a string, a list of token ids, or a list of one of "
                                 "those (batched prompts are not supported)", param="prompt")
        if isinstance(p[0], list) and not p[0]:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return p[0]


_PARAM_RE = re.compile(r"`\$\.([A-Za-z_]\w*)")

# Fields OpenAI or vLLM define that pagedserve does not implement: present and not null (nor
# the value in the second slot, which changes nothing), a 400 naming the field.
_STRUCTURED = "use response_format or structured_outputs"
NOT_IMPLEMENTED: dict[str, tuple[str, Any]] = {
    "functions": ("the legacy `functions` field is not supported; use tools", None),
    "function_call": ("the legacy `function_call` field is not supported; use tool_choice", None),
    "guided_json": (f"guided_json is not supported ({_STRUCTURED})", None),
    "guided_regex": (f"guided_regex is not supported ({_STRUCTURED})", None),
    "guided_choice": (f"guided_choice is not supported ({_STRUCTURED})", None),
    "guided_grammar": (f"guided_grammar is not supported ({_STRUCTURED})", None),
    "guided_decoding_backend": ("guided_decoding_backend is not supported (one backend: llguidance)", None),
    "guided_whitespace_pattern": ("guided_whitespace_pattern is not supported", None),
    "best_of": ("best_of is not supported", 1),
    "suffix": ("suffix is not supported", None),
    "prediction": ("predicted outputs (`prediction`) are not supported", None),
    "audio": ("audio output is not supported", None),
    "modalities": ("only text output is supported", ["text"]),
    "web_search_options": ("web search is not supported", None),
    "reasoning_effort": ("reasoning_effort is not supported", None),
    "structural_tag": ("structural_tag is not supported", None),
}


# OpenAI fields that change nothing in a reply from here (storage, billing and routing hints).
NO_EFFECT = frozenset({"store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key"})


def decode_request(body: bytes, cls: type[Struct]):
    """Decode and validate; raise ``InvalidRequest`` with the offending parameter named. Unknown
    fields are logged and ignored; known but unimplemented ones are refused."""
    try:
        fields = msgspec.json.decode(body, type=dict[str, msgspec.Raw])     # top level, values unparsed
    except msgspec.ValidationError:
        raise InvalidRequest("the request body must be a JSON object") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    for name, (message, harmless) in NOT_IMPLEMENTED.items():
        if name in fields and msgspec.json.decode(fields[name]) not in (None, harmless):
            raise InvalidRequest(message, param=name)
    unknown = sorted(set(fields) - set(cls.__struct_fields__) - set(NOT_IMPLEMENTED) - NO_EFFECT)
    if unknown:      # their names are client text: at debug level only (docs/RELIABILITY.md)
        log.warning("ignoring %d request field(s) no API defines", len(unknown))
        log.debug("ignored fields: %s", ", ".join(unknown[:16]))
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        m = _PARAM_RE.search(str(e))
        raise InvalidRequest(str(e), param=m.group(1) if m else None) from None


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.param = message, param


# --------------------------------------------------------------------------------------------
# responses


class ErrorInfo(Struct):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(Struct):
    error: ErrorInfo


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: Optional[list[int]]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(Struct):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class ToolCallOut(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ChatMessageOut(Struct, omit_defaults=True):
    role: str
    content: Optional[str]
    tool_calls: list[ToolCallOut] = []


class ChatChoice(Struct):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class FunctionDelta(Struct, omit_defaults=True):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDeltaOut(Struct, omit_defaults=True):
    """One piece of a streamed tool call; the client joins the pieces of an ``index``."""

    index: int
    id: Optional[str] = None
    type: Optional[str] = None
    function: Optional[FunctionDelta] = None


class ChatDelta(Struct, omit_defaults=True):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallDeltaOut]] = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    object: str = "chat.completion.chunk"


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    object: str = "text_completion"


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str = "pagedserve"
    max_model_len: Optional[int] = None
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class HealthStatus(Struct):
    status: Literal["ok"] = "ok"
