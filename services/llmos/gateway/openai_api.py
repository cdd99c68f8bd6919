"""The gateway's HTTP door in OpenAI's API: `POST /v1/chat/completions`, `POST /v1/completions`
(streamed as server-sent events or whole), `GET /v1/models`, and the pooling routes
`/v1/embeddings`, `/v1/classify`, `/v1/score` and `/v1/rerank`.

The same door as `Generate` (and `Embed`, `Classify`, `Score`), over HTTP: a request becomes the
same `GenerateRequest`, checked by the same code (`checked_call`), keyed by the same API keys
(`Authorization: Bearer`, decided by `authz.HTTP_TABLE`, default deny), admitted by the same
scheduler under the same tenant, quota and priority ceiling, and traced as one trace (an HTTP
server span above the gateway's `gen_ai` span). A client that closes its connection cancels the
generation (its slot is freed at once); a stream that started says an error as a last
`data: {"error": ...}` event. Errors before the first byte are OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`) with the HTTP status of their gRPC code;
`code` is llmos's `ErrorInfo.reason`, and 429 carries `Retry-After`.

What the bodies may hold and how answers are written is `openai_schema` (chat and completions:
tools, `n`, penalties and `logit_bias`, structured output, log-probabilities named by token
text) and `openai_pooling` (the pooling routes). Unknown fields are ignored, as OpenAI does;
fields llmos cannot honour (images, `echo`, `suffix`, `best_of`, the deprecated `functions`) are
refused with 400 naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import h11
import uvicorn
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmos.common.auth import Guard
from llmos.common.errors import InvalidArgument, LlmosError
from llmos.common.keystore import Role
from llmos.common.security import InsecureBind, is_loopback, over_tls
from llmos.v1 import registry_pb2, registry_pb2_grpc

from .frontdoor import FrontDoor
from .generation import STALL_SECONDS, Generation
from .observe import OTHER_MODEL, GatewayTelemetry
from .openai_pooling import (
    classify_request,
    classify_response,
    embeddings_request,
    embeddings_response,
    rerank_request,
    rerank_response,
    score_request,
    score_response,
)
from .openai_schema import Answer, choices, error_body, error_object, error_response, request_from_json
from .pooling import ModelTasks, pooling_call, run_pooling
from .servicer import checked_call

log = logging.getLogger(__name__)

# Bodies larger than the gRPC door's largest message are refused (413), as soon as that many
# bytes have come, whether the body says its length or comes in chunks.
MAX_BODY_BYTES = 4 * 1024 * 1024
# A body must arrive within this many seconds (408 after), and a connection must send a whole
# request head within HEADER_TIMEOUT of opening or of its last response (closed after; the
# gateway's `http_header_timeout_seconds`).
BODY_TIMEOUT = 30.0
HEADER_TIMEOUT = 10.0
# JSON nested deeper than this is refused (a JSON Schema is at most 32 deep).
MAX_JSON_DEPTH = 64
class _NoSignals(uvicorn.Server):
    """uvicorn inside the gateway's loop: the process's signals stay the gateway's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class OpenAiDoor:
    """The HTTP server (Starlette on uvicorn) in the gateway's process and event loop."""

    def __init__(self, listen: str, front: FrontDoor, registry: registry_pb2_grpc.RegistryServiceStub,
                 telemetry: GatewayTelemetry, guard: Guard, tracer: trace.Tracer, tls_dir: str = "",
                 stall_seconds: float = STALL_SECONDS, header_timeout: float = HEADER_TIMEOUT,
                 tasks: ModelTasks | None = None) -> None:
        if not is_loopback(listen) and not tls_dir:
            raise InsecureBind(f"the gateway's HTTP door will not listen on {listen} without TLS: set its "
                               "tls_dir, or listen on 127.0.0.1")
        self.listen, self.tls_dir, self.stall_seconds = listen, tls_dir, stall_seconds
        self.header_timeout = header_timeout
        self.front, self.registry, self.telemetry, self.guard, self.tracer = front, registry, telemetry, guard, tracer
        self.tasks = tasks or ModelTasks(registry)
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._route("POST /v1/chat/completions", self.chat), methods=["POST"]),
            Route("/v1/completions", self._route("POST /v1/completions", self.completions), methods=["POST"]),
            Route("/v1/models", self._route("GET /v1/models", self.models), methods=["GET"]),
            *(Route(f"/v1/{name}", self._route(f"POST /v1/{name}", self._pooling), methods=["POST"])
              for name in ("embeddings", "classify", "score", "rerank")),
        ], exception_handlers={HTTPException: _http_error, Exception: _unexpected})
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        host, port = self.listen.rsplit(":", 1)
        tls = {}
        if over_tls(self.tls_dir, self.listen, public=True):      # as the gRPC door: plaintext on loopback
            tls = {"ssl_certfile": f"{self.tls_dir}/tls.crt", "ssl_keyfile": f"{self.tls_dir}/tls.key"}
        config = uvicorn.Config(self.app, host=host.strip("[]"), port=int(port), lifespan="off", log_config=None,
                                access_log=False, server_header=False, timeout_graceful_shutdown=None,
                                http=type("TimedH11", (_TimedH11,), {"header_timeout": self.header_timeout}),
                                **tls)
        self._server = _NoSignals(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                with contextlib.suppress(SystemExit):      # uvicorn exits when it cannot bind
                    self._task.result()
                raise OSError(f"the HTTP door could not listen on {self.listen} (the log above says why)")
            await asyncio.sleep(0.01)
        bound = self._server.servers[0].sockets[0].getsockname()
        return f"{host}:{bound[1]}"

    async def stop(self, grace: float) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._server.force_exit = True
            for task in list(self._server.server_state.tasks):
                task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)

    def _route(self, route: str, handler: Callable) -> Callable:
        async def endpoint(request: Request) -> Response:
            span = self.tracer.start_span(route, kind=trace.SpanKind.SERVER, attributes={
                "http.request.method": request.method, "url.path": request.url.path, "server.address": self.listen})
            response: Response | None = None
            try:
                with trace.use_span(span, end_on_exit=False):
                    try:
                        caller = await self.guard.check_key_async(route, request.headers.get("authorization"),
                                                      request.client.host if request.client else "")
                        response = await handler(request, caller, span)
                    except LlmosError as exc:
                        status, body, headers = error_body(exc)
                        response = JSONResponse(body, status_code=status, headers=headers)
                    except Exception:  # noqa: BLE001 - a 500 in OpenAI's shape, the connection kept
                        log.exception("unexpected error in %s", route)
                        response = error_response(500, "internal error", "INTERNAL")
                span.set_attribute("http.response.status_code", response.status_code)
                return response
            finally:
                if not isinstance(response, _Stream):   # a stream ends its span when it ends
                    span.end()
        return endpoint

    async def _body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise _TooLarge()
        try:
            raw = await asyncio.wait_for(_read_body(request), BODY_TIMEOUT)
        except TimeoutError:
            raise _SlowBody() from None
        return parse_json(raw)

    async def chat(self, request: Request, caller, span: trace.Span) -> Response:
        return await self._generate(request, caller, span, chat=True)

    async def completions(self, request: Request, caller, span: trace.Span) -> Response:
        return await self._generate(request, caller, span, chat=False)

    async def _pooling(self, request: Request, caller, span: trace.Span) -> Response:
        """/v1/embeddings, /v1/classify, /v1/score and /v1/rerank: one pooling call each."""
        route = request.url.path.rsplit("/", 1)[-1]
        try:
            body = await self._body(request)
            if route == "embeddings":
                model, pooling, encoding = embeddings_request(body)
            elif route == "rerank":
                model, pooling, top, with_documents = rerank_request(body)
            else:
                model, pooling = (classify_request if route == "classify" else score_request)(body)
            call = pooling_call(model, pooling, 0, request.headers.get("x-request-id") or "", caller.tenant)
            await self.tasks.check(call.model, pooling.task)
        except _TooLarge:
            return error_response(413, f"the body is larger than {MAX_BODY_BYTES} bytes", "BODY_TOO_LARGE")
        except _SlowBody:
            return error_response(408, f"the body did not arrive within {BODY_TIMEOUT:.0f} s", "BODY_TIMEOUT")
        except LlmosError as exc:
            self.telemetry.requests.labels(OTHER_MODEL, "", exc.code).inc()
            raise
        version, request_id, chunk = await run_pooling(self.front, self.telemetry, call, None)
        if route == "embeddings":
            return JSONResponse(embeddings_response(version, chunk, encoding))
        if route == "rerank":
            return JSONResponse(rerank_response(version, chunk, pooling.pairs, top, with_documents))
        made = classify_response if route == "classify" else score_response
        return JSONResponse(made(version, request_id, chunk))

    async def models(self, request: Request, caller, span: trace.Span) -> Response:
        data, token = [], ""
        while True:
            page = await self.registry.ListModels(registry_pb2.ListModelsRequest(page_size=100, page_token=token),
                                                  timeout=30.0)
            data += [{"id": f"{m.name}:{m.tag}", "object": "model", "created": m.create_time.seconds,
                      "owned_by": "llmos"} for m in page.models]
            token = page.next_page_token
            if not token:
                return JSONResponse({"object": "list", "data": data})

    async def _generate(self, request: Request, caller, span: trace.Span, chat: bool) -> Response:
        try:
            body = await self._body(request)
            proto, shape = request_from_json(body, chat)
            request_id = request.headers.get("x-request-id")
            if request_id:
                proto.request_id = request_id
            conversation = request.headers.get("x-llmos-conversation-id")
            if conversation:
                proto.conversation_id = conversation
            admin = caller.role is Role.ADMIN or not caller.key_id
            calls = [await checked_call(p, caller.tenant, admin=admin) for p in choices(proto, shape["n"])]
            await self.tasks.check(calls[0].model, "generate")
        except _TooLarge:
            self.telemetry.requests.labels(OTHER_MODEL, "", "INVALID_ARGUMENT").inc()
            return error_response(413, f"the body is larger than {MAX_BODY_BYTES} bytes", "BODY_TOO_LARGE")
        except _SlowBody:
            self.telemetry.requests.labels(OTHER_MODEL, "", "DEADLINE_EXCEEDED").inc()
            return error_response(408, f"the body did not arrive within {BODY_TIMEOUT:.0f} s", "BODY_TIMEOUT")
        except LlmosError as exc:        # refused before it started (what starts is counted by its watch)
            self.telemetry.requests.labels(OTHER_MODEL, "", exc.code).inc()
            raise
        answer = Answer(calls[0].model, chat, shape)
        generations: list[Generation] = []
        watches = []

        def start(call) -> Generation:
            watch = self.telemetry.start(call)
            watches.append(watch)
            generations.append(Generation(watch, self.front.generate(call, None, watch.routed), self.stall_seconds))
            return generations[-1]

        async def cancel() -> None:
            for generation in generations:
                await generation.cancel()

        try:           # errors before the first token are the response's status
            firsts = [await start(calls[0]).next()]
            answer.model = watches[0].version or answer.model     # the version that answers (an alias resolved)
            # The other choices once the first has its prompt in the cache: they find its blocks there.
            firsts += await asyncio.gather(*(start(call).next() for call in calls[1:]))
        except BaseException:
            await cancel()
            raise
        if shape["stream"]:
            async def ended() -> None:
                await cancel()
                span.end()
            return _Stream(answer.events(firsts, generations), ended, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        whole = asyncio.ensure_future(answer.whole(firsts, generations))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({whole, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            whole.cancel()
            gone.cancel()
            await cancel()
            await asyncio.gather(whole, gone, return_exceptions=True)
        if whole.cancelled():
            return error_response(499, "the client closed the connection", "CANCELLED")
        return whole.result()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (404 no such route, 405 wrong method) in OpenAI's shape."""
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_REQUEST")
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse(error_object(exc.status_code, message.get(exc.status_code, str(exc.detail)), code),
                        status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", "INTERNAL")


class _TimedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request head
    within `header_timeout` of opening or of its last response (a slow or silent client holds no
    connection for long)."""

    _header_timer: asyncio.TimerHandle | None = None
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_late(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


async def _read_body(request: Request) -> bytes:
    """The body, refused (`_TooLarge`) as soon as it passes MAX_BODY_BYTES: a chunked body is
    never buffered whole first."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _TooLarge()
        parts.append(part)
    return b"".join(parts)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON: valid UTF-8 throughout (no lone surrogates), at most
    MAX_JSON_DEPTH deep; anything else is INVALID_ARGUMENT."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidArgument.field("body", f"is nested more than {MAX_JSON_DEPTH} deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument.field("body", f"is not valid JSON: {exc}") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument.field("body", f"is nested more than {MAX_JSON_DEPTH} deep")
        if isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                raise InvalidArgument.field("body", "holds a string that is not valid Unicode (a lone "
                                                    "surrogate escape such as \\ud800)") from None
    return value


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (its body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """A streamed answer that runs `ended` however it ends: sent, failed, or the client gone."""

    def __init__(self, content: AsyncIterator[str], ended: Callable, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._ended = ended

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._ended()


class _TooLarge(Exception):
    pass


class _SlowBody(Exception):
    pass

