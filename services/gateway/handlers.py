"""The gateway's route handlers and the state they share (``Gateway``: engine client, tokenizer,
limits, metrics). Chat and completions differ only in how the prompt is built and how the
output is shaped (formats.py); both take the one generation path, ``_generate``."""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from typing import Optional

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from shared.messages import GrammarSpec, SchedulerStats

from . import protocol as P
from . import tools as T
from .detokenizer import make_decode
from .engine_client import EngineClient, EngineError
from .errors import APIError, json_response
from .formats import ChatFormat, CompletionFormat
from .generation import Generation
from .metrics import CONTENT_TYPE, GatewayMetrics
from .openapi import openapi_schema
from .sse import sse_stream
from .structured import check_spec, grammar_of

log = logging.getLogger("pagedserve.gateway")


def _template_parameters(tokenizer) -> frozenset[str]:
    """``apply_chat_template``'s own parameters: a client's ``chat_template_kwargs`` may not set
    them (``chat_template`` would run a client-written Jinja template, ``tokenize`` etc. would
    break the call)."""
    try:
        names = set(inspect.signature(tokenizer.apply_chat_template).parameters)
    except (TypeError, ValueError):
        names = set()
    return frozenset((names | {"chat_template", "tokenize", "conversation", "tools", "documents"})
                     - {"kwargs", "self"})


class Gateway:
    """Everything the handlers share."""

    def __init__(self, engine: EngineClient, tokenizer, served_model_name: str, max_model_len: int,
                 max_body_bytes: int, max_n: int, tool_call_parser: str = "auto",
                 prefix_cache_salt_required: bool = False):
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.max_model_len = served_model_name, max_model_len
        self.max_body_bytes, self.max_n = max_body_bytes, max_n
        self.template_parameters = _template_parameters(tokenizer)
        self.decode = make_decode(tokenizer)
        self.decode_token = make_decode(tokenizer, skip_special_tokens=False)
        self.vocab_size = len(tokenizer)
        self.metrics = GatewayMetrics(engine.engine_stats, served_model_name)
        self.tool_call_parser = T.resolve_parser_name(tool_call_parser, tokenizer)
        self.created = int(time.time())
        self.prefix_cache_salt_required = prefix_cache_salt_required

    # -- request plumbing ---------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        too_big = APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                           code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_big
        return bytes(body)

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves "
                                f"`{self.model_name}`).", param="model", code="model_not_found")

    async def context_limit(self) -> int:
        if not self.max_model_len:
            stats = await self.engine.stats()
            self.max_model_len = stats.max_model_len
        return self.max_model_len

    def check_token_ids(self, token_ids, param: str) -> None:
        bad = next((t for t in token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of vocabulary (size {self.vocab_size})", param=param)

    @staticmethod
    def check_fits_kv_cache(stats: SchedulerStats, num_prompt: int, max_tokens: int) -> None:
        """400 for a sequence the whole KV cache could never hold, rather than one cut short.

        Per sample: the ``n`` samples of a request need not be resident together (the scheduler
        preempts siblings by recompute and finishes them in turn)."""
        bs, total = stats.block_size, stats.num_blocks
        if not (bs and total):                     # not known yet (executor loading)
            return
        need = -(-(num_prompt + max_tokens) // bs)
        if need > total:
            raise APIError(400, f"a sequence of {num_prompt + max_tokens} tokens needs {need} KV cache "
                                f"blocks of {bs} tokens but the server has {total}; reduce "
                                "max_tokens or the prompt", param="max_tokens", code="kv_cache_exceeded")

    async def plan(self, req: P._SamplingFields, prompt_ids: list[int], prompt_param: str,
                   default_max_tokens: Optional[int]):
        """Check lengths; return the SamplingParams to send."""
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if req.n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n}, got {req.n}", param="n")
        if self.prefix_cache_salt_required and req.cache_salt is None:
            raise APIError(400, "this server requires a cache_salt on every request "
                                "(--prefix-cache-salt-required)", param="cache_salt")
        req.check_beam_search()
        self.check_token_ids(prompt_ids, prompt_param)
        for param, ids in req.token_id_fields().items():
            self.check_token_ids(ids, param)
        limit = await self.context_limit()
        if limit and n >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                                f"your prompt has {n} tokens.", param=prompt_param,
                           code="context_length_exceeded")
        stats = await self.engine.stats()          # cached by the engine client
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:                     # the default fills what is left of context and KV cache
            capacity = min(x for x in (limit, stats.block_size * stats.num_blocks, n + 1024) if x)
            room = max(capacity - n, 1)
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        elif limit and n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                                f"you requested {n + max_tokens} tokens ({n} in the prompt, "
                                f"{max_tokens} in the completion). Please reduce the length of "
                                "the prompt or completion.", param="max_tokens",
                           code="context_length_exceeded")
        self.check_fits_kv_cache(stats, n, max_tokens)
        try:
            return req.to_sampling(max_tokens)
        except msgspec.ValidationError as e:
            raise APIError(400, str(e)) from None

    async def start(self, request: Request, gen: Generation, prompt_param: str) -> None:
        """Submit, giving up (and aborting) if the client leaves before the first token."""
        try:
            await unless_disconnected(request, gen.start())
        except EngineError as e:
            raise APIError.from_engine(e, prompt_param) from None

    def usage(self, gen: Generation) -> P.Usage:
        return P.Usage(prompt_tokens=gen.num_prompt_tokens, completion_tokens=gen.num_generated_tokens,
                       total_tokens=gen.num_prompt_tokens + gen.num_generated_tokens,
                       prompt_tokens_details=P.PromptTokensDetails(gen.num_cached_tokens))


async def unless_disconnected(request: Request, coro):
    """Run ``coro``; if the client disconnects first, cancel it and raise ClientDisconnect."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()


def _endpoint(fn):
    """Turn APIError / ClientDisconnect / unexpected errors into OpenAI-shaped responses."""

    async def handler(request: Request) -> Response:
        gw: Gateway = request.app.state.gateway
        try:
            return await fn(gw, request)
        except APIError as e:
            return e.response()
        except P.InvalidRequest as e:
            return APIError(400, e.message, param=e.param).response()
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception:
            log.exception("internal error on %s", request.url.path)
            return APIError(500, "internal server error", "server_error").response()

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


async def _generate(gw: Gateway, request: Request, req, prompt_ids: list[int], fmt: type,
                    grammar: Optional[GrammarSpec] = None, **fmt_options) -> Response:
    """Check, submit and stream (or collect) one generation, shaped by ``fmt`` (a format class)."""
    sampling = await gw.plan(req, prompt_ids, fmt.param, default_max_tokens=fmt.default_max_tokens)
    rid = f"{fmt.prefix}-{uuid.uuid4().hex}"
    gen = Generation(gw.engine, gw.decode, rid, prompt_ids, sampling, req.stop_strings, gw.metrics.timer(),
                     grammar, cache_salt=req.cache_salt)
    await gw.start(request, gen, fmt.param)
    out = fmt(gw.decode_token, rid, int(time.time()), gw.model_name, sampling, **fmt_options)
    if req.stream:
        return sse_stream(rid, gen, out.head(), out.chunks,
                          (lambda: out.usage_chunk(gw.usage(gen))) if req.include_usage else None)

    async def collect() -> None:
        async for d in gen.deltas():
            out.add(d)

    try:
        await unless_disconnected(request, collect())
    except EngineError as e:
        raise APIError.from_engine(e) from None
    return json_response(out.response(gw.usage(gen)))


def _constraint_and_tool_reader(gw: Gateway, req: P.ChatCompletionRequest, tools: list[dict], choice):
    """The chat request's output constraint and how its reply becomes tool calls (None: it
    holds none): tool_choice required / named constrain the output to calls; auto leaves it
    free and parses it (unless response_format asks for plain JSON); none ignores the tools."""
    grammar = grammar_of(req)
    if not tools or choice == "none":
        return grammar, None
    tool_grammar = T.tool_choice_grammar(tools, choice, req.parallel_tool_calls)
    if tool_grammar is None:
        return grammar, (T.get_tool_parser(gw.tool_call_parser) if grammar is None else None)
    if req.use_beam_search:
        raise APIError(400, "use_beam_search does not take tool_choice required or a named tool",
                       param="tool_choice")
    if grammar is not None:
        raise APIError(400, "response_format / structured_outputs cannot be combined with "
                            "tool_choice required or a named tool", param="tool_choice")
    check_spec(tool_grammar, "tools")
    return tool_grammar, T.ConstrainedCalls(choice)


@_endpoint
async def chat_completions(gw: Gateway, request: Request) -> Response:
    req = P.decode_request(await gw.read_body(request), P.ChatCompletionRequest)
    gw.check_model(req.model)
    reserved = sorted(gw.template_parameters.intersection(req.chat_template_kwargs or ()))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                       param="chat_template_kwargs")
    tools = [msgspec.to_builtins(t) for t in req.tools or ()]
    choice = T.resolve_tool_choice(tools, msgspec.to_builtins(req.tool_choice))
    T.check_tools(tools, choice)
    grammar, reader = _constraint_and_tool_reader(gw, req, tools, choice)
    try:
        messages = [m.as_template_input() for m in req.messages]
        prompt = T.render_prompt(gw.tokenizer, messages, tools if choice != "none" else [], gw.tool_call_parser,
                                 add_generation_prompt=req.add_generation_prompt,
                                 **(req.chat_template_kwargs or {}))
    except (P.InvalidRequest, APIError):
        raise
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # jinja2 errors raised by the template
        raise APIError(400, f"chat template failed: {e}", param="messages") from None
    prompt_ids = await asyncio.to_thread(gw.tokenizer.encode, prompt, add_special_tokens=False)
    return await _generate(gw, request, req, prompt_ids, ChatFormat, grammar, tools=reader)


@_endpoint
async def completions(gw: Gateway, request: Request) -> Response:
    req = P.decode_request(await gw.read_body(request), P.CompletionRequest)
    gw.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        prompt_ids = await asyncio.to_thread(gw.tokenizer.encode, prompt)
    else:
        prompt_ids = list(prompt)
    return await _generate(gw, request, req, prompt_ids, CompletionFormat, grammar_of(req))


@_endpoint
async def list_models(gw: _Gateway, request: Request) -> Response:
    card = P.ModelCard(gw.model_name, gw.created, max_model_len=(await gw.context_limit()) or None)
    return json_response(P.ModelList([card]))


async def health(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    stats = await gw.engine.stats()
    if stats.executor_ready:
        return json_response(P.HealthStatus())
    return APIError(503, "the model executor is not ready", "service_unavailable_error",
                    code="not_ready").response()


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.engine.stats()      # refresh the cached scheduler stats (at most every ~0.5 s)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return json_response(openapi_schema())
