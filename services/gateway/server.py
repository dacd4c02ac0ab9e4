"""The OpenAI-compatible HTTP gateway (Starlette on uvicorn) and `pagedserve gateway`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics, GET /openapi.json. Never touches block ids and never imports torch.

Hostile input is refused before it reaches the scheduler: body size (413), header size (uvicorn's
h11 limit, 400), every field's range and count (protocol.py), token ids outside the vocabulary,
requests longer than the context or larger than the whole KV cache (400). ``--api-key`` guards
every route but /health.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import inspect
import logging
import time
import uuid
from typing import AsyncIterator, Callable, Iterable, Iterator, Optional

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shared.messages import SchedulerStats

from . import protocol as P
from .detokenizer import make_decode
from .engine_client import EngineClient, EngineError
from .lifecycle import Lifecycle
from .lifecycle import add_arguments as add_lifecycle_arguments
from .lifecycle import serve
from .generation import Generation, SampleDelta
from .metrics import CONTENT_TYPE, GatewayMetrics
from .openapi import openapi_schema

log = logging.getLogger("pagedserve.gateway")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 16 * 1024     # request line + headers (h11's incomplete-event limit)
DEFAULT_MAX_N = 16
OPEN_PATHS = frozenset({"/health"})      # the only route served without the API key
_json = msgspec.json.Encoder()

# scheduler RequestError code -> (HTTP status, OpenAI error type)
_ENGINE_ERRORS = {
    "queue_full": (429, "rate_limit_error"),
    "too_long": (400, "invalid_request_error"),
    "invalid": (400, "invalid_request_error"),
    "not_ready": (503, "service_unavailable_error"),
    "executor_error": (500, "server_error"),
    "engine_unavailable": (503, "service_unavailable_error"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def info(self) -> P.ErrorInfo:
        return P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> Response:
        return _json_response(P.ErrorResponse(self.info()), self.status, self.headers)

    @classmethod
    def from_engine(cls, e: EngineError, param: Optional[str] = None) -> "APIError":
        status, type_ = _ENGINE_ERRORS.get(e.code, (500, "server_error"))
        headers = {"Retry-After": "1"} if e.code == "queue_full" else None
        return cls(status, e.message, type_, param if e.code == "too_long" else None, e.code, headers)


def _json_response(obj, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(_json.encode(obj), status, headers, media_type="application/json")


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


def _sse_stream(rid: str, gen: Generation, head: Iterable[bytes], chunks_of: Callable[[SampleDelta], Iterable[bytes]],
                usage_chunk: Optional[Callable[[], bytes]]) -> _SSEResponse:
    """The event stream of one generation: ``head``, the chunks ``chunks_of`` makes of each delta,
    then an error event if the engine failed, else the usage chunk (when one is asked for), then
    ``[DONE]`` either way."""
    async def events() -> AsyncIterator[bytes]:
        for event in head:
            yield event
        try:
            async for d in gen.deltas():
                for event in chunks_of(d):
                    yield event
        except EngineError as e:
            yield _sse(P.ErrorResponse(APIError.from_engine(e).info()))
        else:
            if usage_chunk is not None:
                yield usage_chunk()
        yield _SSE_DONE

    return _SSEResponse(events(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Request-Id": rid})


class _SSEResponse(StreamingResponse):
    """Streams while listening for the client going away (whatever the ASGI spec version), and
    always closes the body iterator so the generation aborts its request."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def _authorized(headers, api_key: bytes) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return hmac.compare_digest(token.strip().encode(), api_key) and scheme.lower() == "bearer"


class _RequireAPIKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every HTTP route but OPEN_PATHS, compared
    in constant time. Unknown routes are refused too, so nothing is learnt without the key."""

    def __init__(self, app, api_key: Optional[str]):
        self.app, self.api_key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.api_key is not None and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            if not _authorized(Request(scope).headers, self.api_key):
                response = APIError(401, "Incorrect API key provided.", "authentication_error",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _LimitHeaders:
    """ASGI middleware: 431 when the request line + headers exceed ``max_bytes``. uvicorn's h11
    limit only bounds headers that arrive in pieces; one read can bring up to 64 KiB at once."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
                sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.max_bytes:
                response = APIError(431, f"request headers exceed the limit of {self.max_bytes} bytes",
                                    code="headers_too_large").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


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


class _Gateway:
    """Everything the handlers share."""

    def __init__(self, engine: EngineClient, tokenizer, served_model_name: str, max_model_len: int,
                 max_body_bytes: int, max_n: int = DEFAULT_MAX_N):
        self.engine, self.tokenizer = engine, tokenizer
        self.model_name, self.max_model_len = served_model_name, max_model_len
        self.max_body_bytes, self.max_n = max_body_bytes, max_n
        self.template_parameters = _template_parameters(tokenizer)
        self.decode = make_decode(tokenizer)
        self.decode_token = make_decode(tokenizer, skip_special_tokens=False)
        self.vocab_size = len(tokenizer)
        self.metrics = GatewayMetrics(engine.last_stats, served_model_name)
        self.created = int(time.time())

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
            await _unless_disconnected(request, gen.start())
        except EngineError as e:
            raise APIError.from_engine(e, prompt_param) from None

    def usage(self, gen: Generation) -> P.Usage:
        return P.Usage(prompt_tokens=gen.num_prompt_tokens, completion_tokens=gen.num_generated_tokens,
                       total_tokens=gen.num_prompt_tokens + gen.num_generated_tokens,
                       prompt_tokens_details=P.PromptTokensDetails(gen.num_cached_tokens))

    # -- logprobs ------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.decode_token([token_id])

    def chat_logprobs(self, d: SampleDelta) -> Optional[P.ChatLogprobs]:
        if not d.logprobs:
            return None
        content = []
        for tid, lp in zip(d.token_ids, d.logprobs):
            tok = self._token(tid)
            top = [P.TopLogprob(t, v, list(t.encode())) for t, v in
                   ((self._token(i), v) for i, v in zip(lp.top_token_ids, lp.top_logprobs))]
            content.append(P.ChatTokenLogprob(tok, lp.logprob, list(tok.encode()), top))
        return P.ChatLogprobs(content)

    def completion_logprobs(self, d: SampleDelta, offset: int) -> Optional[P.CompletionLogprobs]:
        if not d.logprobs:
            return None
        out = P.CompletionLogprobs([], [], [], [])
        for tid, lp in zip(d.token_ids, d.logprobs):
            tok = self._token(tid)
            out.tokens.append(tok)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token(i): v for i, v in zip(lp.top_token_ids, lp.top_logprobs)})
            out.text_offset.append(offset)
            offset += len(tok)
        return out


async def _unless_disconnected(request: Request, coro):
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


def _merge(a: Optional[P.ChatLogprobs], b: Optional[P.ChatLogprobs]) -> Optional[P.ChatLogprobs]:
    if b is None:
        return a
    if a is None:
        return P.ChatLogprobs(list(b.content))
    a.content.extend(b.content)
    return a


# --------------------------------------------------------------------------------------------
# handlers


def _endpoint(fn):
    """Turn APIError / ClientDisconnect / unexpected errors into OpenAI-shaped responses."""

    async def handler(request: Request) -> Response:
        gw: _Gateway = request.app.state.gateway
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


@_endpoint
async def chat_completions(gw: _Gateway, request: Request) -> Response:
    req = P.decode_request(await gw.read_body(request), P.ChatCompletionRequest)
    gw.check_model(req.model)
    reserved = sorted(gw.template_parameters.intersection(req.chat_template_kwargs or ()))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                       param="chat_template_kwargs")
    try:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        prompt = gw.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
            **(req.chat_template_kwargs or {}))
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # jinja2 errors raised by the template
        raise APIError(400, f"chat template failed: {e}", param="messages") from None
    prompt_ids = await asyncio.to_thread(gw.tokenizer.encode, prompt, add_special_tokens=False)
    sampling = await gw.plan(req, prompt_ids, "messages", default_max_tokens=None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = Generation(gw.engine, gw.decode, rid, prompt_ids, sampling, req.stop_strings, gw.metrics.timer())
    await gw.start(request, gen, "messages")
    created, model = int(time.time()), gw.model_name

    if req.stream:
        def chunk(choices, usage=None) -> bytes:
            return _sse(P.ChatCompletionChunk(rid, created, model, choices, usage))

        def chunks_of(d: SampleDelta) -> Iterator[bytes]:
            lp = gw.chat_logprobs(d)
            if d.text or lp:
                yield chunk([P.ChatChunkChoice(d.index, P.ChatDelta(content=d.text), lp)])
            if d.finish_reason:
                yield chunk([P.ChatChunkChoice(d.index, P.ChatDelta(), None, d.finish_reason)])

        roles = (chunk([P.ChatChunkChoice(i, P.ChatDelta(role="assistant", content=""))]) for i in range(sampling.n))
        return _sse_stream(rid, gen, roles, chunks_of,
                           (lambda: chunk([], gw.usage(gen))) if req.include_usage else None)

    texts = [[] for _ in range(sampling.n)]
    logprobs: list[Optional[P.ChatLogprobs]] = [None] * sampling.n
    reasons: list[Optional[str]] = [None] * sampling.n

    async def collect() -> None:
        async for d in gen.deltas():
            texts[d.index].append(d.text)
            logprobs[d.index] = _merge(logprobs[d.index], gw.chat_logprobs(d))
            reasons[d.index] = d.finish_reason or reasons[d.index]

    try:
        await _unless_disconnected(request, collect())
    except EngineError as e:
        raise APIError.from_engine(e) from None
    choices = [P.ChatChoice(i, P.ChatMessageOut("assistant", "".join(texts[i])),
                            logprobs[i] if sampling.logprobs is not None else None, reasons[i])
               for i in range(sampling.n)]
    return _json_response(P.ChatCompletionResponse(rid, created, model, choices, gw.usage(gen)))


@_endpoint
async def completions(gw: _Gateway, request: Request) -> Response:
    req = P.decode_request(await gw.read_body(request), P.CompletionRequest)
    gw.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        prompt_ids = await asyncio.to_thread(gw.tokenizer.encode, prompt)
    else:
        prompt_ids = list(prompt)
    sampling = await gw.plan(req, prompt_ids, "prompt", default_max_tokens=16)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gen = Generation(gw.engine, gw.decode, rid, prompt_ids, sampling, req.stop_strings, gw.metrics.timer())
    await gw.start(request, gen, "prompt")
    created, model = int(time.time()), gw.model_name
    offsets = [0] * sampling.n

    if req.stream:
        def chunk(choices, usage=None) -> bytes:
            return _sse(P.CompletionResponse(rid, created, model, choices, usage))

        def chunks_of(d: SampleDelta) -> Iterator[bytes]:
            lp = gw.completion_logprobs(d, offsets[d.index])
            offsets[d.index] += len(d.text)
            if d.text or lp or d.finish_reason:
                yield chunk([P.CompletionChoice(d.index, d.text, lp, d.finish_reason)])

        return _sse_stream(rid, gen, (), chunks_of, (lambda: chunk([], gw.usage(gen))) if req.include_usage else None)

    texts = [[] for _ in range(sampling.n)]
    logprobs = [P.CompletionLogprobs([], [], [], []) if sampling.logprobs is not None else None
                for _ in range(sampling.n)]
    reasons: list[Optional[str]] = [None] * sampling.n

    async def collect() -> None:
        async for d in gen.deltas():
            lp = gw.completion_logprobs(d, offsets[d.index])
            offsets[d.index] += len(d.text)
            texts[d.index].append(d.text)
            if lp is not None and logprobs[d.index] is not None:
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs[d.index], field).extend(getattr(lp, field))
            reasons[d.index] = d.finish_reason or reasons[d.index]

    try:
        await _unless_disconnected(request, collect())
    except EngineError as e:
        raise APIError.from_engine(e) from None
    choices = [P.CompletionChoice(i, "".join(texts[i]), logprobs[i], reasons[i]) for i in range(sampling.n)]
    return _json_response(P.CompletionResponse(rid, created, model, choices, gw.usage(gen)))


@_endpoint
async def list_models(gw: _Gateway, request: Request) -> Response:
    card = P.ModelCard(gw.model_name, gw.created, max_model_len=(await gw.context_limit()) or None)
    return _json_response(P.ModelList([card]))


async def health(request: Request) -> Response:
    gw: _Gateway = request.app.state.gateway
    stats = await gw.engine.stats()
    if stats.executor_ready:
        return _json_response(P.HealthStatus())
    return APIError(503, "the model executor is not ready", "service_unavailable_error",
                    code="not_ready").response()


async def metrics(request: Request) -> Response:
    gw: _Gateway = request.app.state.gateway
    await gw.engine.stats()      # refresh the cached scheduler stats (at most every ~0.5 s)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return _json_response(openapi_schema())


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return APIError(exc.status_code, exc.detail, "invalid_request_error" if exc.status_code < 500
                    else "server_error", headers=exc.headers).response()


def build_app(engine_client: EngineClient, tokenizer, served_model_name: str, max_model_len: int = 0,
              api_key: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_n: int = DEFAULT_MAX_N, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Starlette:
    """The ASGI app. ``max_model_len`` 0 = learn it from the scheduler's stats."""
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]

    lifecycle = Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await engine_client.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan,
                    middleware=[lifecycle.middleware(), Middleware(_LimitHeaders, max_bytes=max_header_bytes),
                                Middleware(_RequireAPIKey, api_key=api_key)])
    app.state.lifecycle = lifecycle
    app.state.gateway = _Gateway(engine_client, tokenizer, served_model_name, max_model_len,
                                 max_body_bytes, max_n)
    return app


# --------------------------------------------------------------------------------------------
# CLI: pagedserve gateway


def uvicorn_options(host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, limit_concurrency: int = 0) -> dict:
    """uvicorn settings that bound what a client can make the HTTP layer hold: h11 (whose buffer
    for a header block arriving in pieces is bounded) and, optionally, open connections."""
    return dict(host=host, port=port, log_level=log_level, http="h11",
                h11_max_incomplete_event_size=max_header_bytes,
                limit_concurrency=limit_concurrency or None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler-addr", action="append", required=True, metavar="ADDR",
                        help="scheduler ROUTER address (ipc://… or tcp://…); repeat to front several")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="", help="model whose tokenizer to use ('' = bundled default)")
    parser.add_argument("--served-model-name", default=None, help="name clients pass as `model`")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on every route but /health")
    parser.add_argument("--max-model-len", type=int, default=0,
                        help="context limit for prompt checks (0 = from the scheduler)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413")
    parser.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                        help="larger request lines + headers get 431")
    parser.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, help="most samples per request (n)")
    parser.add_argument("--limit-concurrency", type=int, default=0,
                        help="most open connections before uvicorn answers 503 (0 = no limit)")
    parser.add_argument("--log-level", default="info")
    add_lifecycle_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from shared.model_path import resolve_model
    from shared.transport import check_address

    from .tokenizer import load_tokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        addrs = [check_address(a) for a in args.scheduler_addr]
        src = resolve_model(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagedserve gateway: {e}")
        return 2
    if args.max_model_len < 0 or min(args.max_body_bytes, args.max_header_bytes, args.max_n) < 1 \
            or not 1 <= args.max_n <= P.MAX_N or args.limit_concurrency < 0:
        print("pagedserve gateway: --max-model-len and --limit-concurrency must be >= 0, "
              f"--max-body-bytes and --max-header-bytes >= 1, --max-n in 1..{P.MAX_N}")
        return 2
    tokenizer = load_tokenizer(src)
    app = build_app(EngineClient(addrs), tokenizer, args.served_model_name or src.name,
                    args.max_model_len, args.api_key, args.max_body_bytes, args.max_n, args.max_header_bytes)
    serve(app, args.drain_timeout, **uvicorn_options(args.host, args.port, args.log_level, args.max_header_bytes,
                                                     args.limit_concurrency))
    return 0
