"""Server-sent events: ``data: {...}`` chunks, an error event if the engine fails, ``data: [DONE]``."""
from __future__ import annotations

from typing import AsyncIterator, Callable, Iterable, Optional

import anyio
import msgspec
from starlette.responses import StreamingResponse

from . import protocol as P
from .engine_client import EngineError
from .errors import APIError
from .generation import Generation, SampleDelta

_json = msgspec.json.Encoder()
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def sse_stream(rid: str, gen: Generation, head: Iterable[bytes], chunks_of: Callable[[SampleDelta], Iterable[bytes]],
               usage_chunk: Optional[Callable[[], bytes]]) -> "SSEResponse":
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
            yield sse(P.ErrorResponse(APIError.from_engine(e).info()))
        else:
            if usage_chunk is not None:
                yield usage_chunk()
        yield SSE_DONE

    return SSEResponse(events(), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Request-Id": rid})


class SSEResponse(StreamingResponse):
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
