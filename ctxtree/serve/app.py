"""The HTTP API (design.md): /v1/query, OpenAI-compatible /v1/chat/completions and
/v1/models, /v1/documents/{id}, /v1/prewarm, /healthz, /metrics.

Routes are thin: validate (pydantic), call one Backend method (ctxtree/serve/backends.py: a
local DecoderService, or decoder replicas behind a Serve handle), and turn a Failure
(ctxtree/serve/protocol.py, where errors map to status codes, once) into the OpenAI error shape
({"error": {"message", "type", "code"}}) everywhere. Streams fail early: the first
piece is awaited before the 200 is sent, so a bad request never becomes a broken
stream; SSE ends with `data: [DONE]`, and a client that disconnects stops its tokens.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ctxtree.kernels.generate import SamplingConfig
from ctxtree.serve.backends import Backend, LocalBackend
from ctxtree.serve.limits import BodyTimeout, ClientLimits, ClientLimitsMiddleware
from ctxtree.serve.metrics import Metrics
from ctxtree.serve.protocol import AnswerRequest, Failure, failure_of
from ctxtree.serve.service import AnswerEnd, DecoderService

API_TOKEN_ENV = "CTXTREE_API_TOKEN"
MODEL_ALIASES_ENV = "CTXTREE_MODEL_ALIASES"   # comma-separated names also answered as our model
SERVICE_NAME = "ctxtree"                      # always answered as our model, whatever the checkpoint


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[str] = Field(min_length=1)
    question: str = Field(min_length=1)
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    policy: Literal["query", "vector", "right"] = "query"
    stop: str | list[str] | None = None
    stream: bool = False


class TextPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None   # a string, or parts as many clients send


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, ...)
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    documents: list[str] = Field(default_factory=list)   # extra body field: the context
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at values that change nothing; anything else is a 400 that says so,
    # never silently ignored.
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None


MAX_STOP_SEQUENCES = 4   # as OpenAI's API


def message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise Unsupported(f"messages[{index}].content: only text parts are supported, got {part.type!r}")
    return "".join(part.text for part in message.content)


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
        raise ValueError(f"stop: up to {MAX_STOP_SEQUENCES} non-empty sequences")
    return stops


def refuse_unsupported(body: ChatRequest) -> None:
    """A 400 for every parameter we would otherwise have to ignore."""
    if body.n not in (None, 1):
        raise Unsupported(f"n = {body.n}: one choice per request is supported; send n = 1 (or several requests)")
    if body.logprobs or body.top_logprobs:
        raise Unsupported("logprobs are not supported")
    if body.tools or body.functions:
        raise Unsupported("tools and function calling are not supported")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise Unsupported(f"response_format {body.response_format.get('type')!r}: only 'text' is supported")
    if body.presence_penalty or body.frequency_penalty or body.logit_bias:
        raise Unsupported("presence_penalty, frequency_penalty and logit_bias are not supported")


class DocumentsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[str] = Field(min_length=1)


class Unsupported(Exception):
    """A valid OpenAI parameter this server does not implement: 400, never ignored."""


class UnknownModel(Exception):
    pass


def error_response(e: Exception | Failure) -> JSONResponse:
    if isinstance(e, Unsupported):
        e = Failure(400, "unsupported_parameter", str(e))
    elif isinstance(e, UnknownModel):
        e = Failure(404, "model_not_found", str(e))
    f = e if isinstance(e, Failure) else failure_of(e)
    kind = "invalid_request_error" if f.status < 500 else "server_error"
    return JSONResponse({"error": {"message": f.message, "type": kind, "code": f.code}}, status_code=f.status)


class Failed(Exception):
    """A Failure met while reading an answer stream, raised to leave the route."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


def sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def build_app(backend: Backend | DecoderService, api_token: str | None = None,
              model_aliases: tuple[str, ...] | None = None, limits: ClientLimits | None = None) -> FastAPI:
    if isinstance(backend, DecoderService):
        backend = LocalBackend(backend)
    app = FastAPI(title="ctxtree", version="0.1.0")
    app.add_middleware(ClientLimitsMiddleware, limits=limits or ClientLimits.from_env())
    metrics = Metrics(backend)
    token = api_token if api_token is not None else os.environ.get(API_TOKEN_ENV) or None
    aliases = model_aliases if model_aliases is not None else \
        tuple(a.strip() for a in os.environ.get(MODEL_ALIASES_ENV, "").split(",") if a.strip())

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        open_paths = ("/healthz", "/metrics")
        if token and request.url.path not in open_paths and \
                request.headers.get("authorization") != f"Bearer {token}":
            response = JSONResponse({"error": {"message": "missing or wrong bearer token",
                                               "type": "invalid_request_error", "code": "unauthorized"}},
                                    status_code=401)
        else:
            response = await call_next(request)
        metrics.count(request.url.path, response.status_code)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        if isinstance(exc.__cause__, BodyTimeout):  # FastAPI wraps errors met reading the body
            return error_response(Failure(408, "request_timeout", str(exc.__cause__)))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        response = error_response(Failure(exc.status_code, code, str(exc.detail)))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(ValueError(f"{where}: {first.get('msg', 'invalid request')}"))

    async def next_event(stream):
        item = await stream.__anext__()
        if isinstance(item, Failure):
            await stream.aclose()
            raise Failed(item)
        return item

    async def start(request: AnswerRequest):
        """The answer stream with its first item already produced (errors surface here)."""
        stream = backend.answer(request)
        return await next_event(stream), stream

    async def drain(first, stream) -> tuple[str, AnswerEnd]:
        pieces, item = [], first
        while not isinstance(item, AnswerEnd):
            pieces.append(item)
            item = await next_event(stream)
        return "".join(pieces), item

    async def events(first, stream, to_event, closing) -> AsyncIterator[bytes]:
        item = first
        try:
            while True:
                if isinstance(item, AnswerEnd):
                    metrics.observe(item)
                    for payload in closing(item):
                        yield sse(payload)
                    yield sse("[DONE]")
                    return
                yield sse(to_event(item))
                item = await next_event(stream)
        except Failed as e:  # after the 200: the error is the stream's last event
            yield sse({"error": {"message": e.failure.message, "type": "server_error", "code": e.failure.code}})
        finally:
            await stream.aclose()  # client gone: stop generating for it

    async def respond(streaming: bool, first, stream, to_event, closing, to_body):
        """SSE of the stream, or the whole answer as one JSON body."""
        if streaming:
            return StreamingResponse(events(first, stream, to_event, closing), media_type="text/event-stream")
        try:
            text, end = await drain(first, stream)
        except Failed as e:
            return error_response(e.failure)
        except Exception as e:
            return error_response(e)
        metrics.observe(end)
        return JSONResponse(to_body(text.strip(), end), headers={"x-ctxtree-replica": end.replica})

    @app.post("/v1/query")
    async def query(body: QueryRequest):
        try:
            sampling = SamplingConfig(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p)
            first, stream = await start(AnswerRequest(body.documents, body.question, sampling, body.seed,
                                                      body.policy, stop_sequences(body.stop)))
        except Failed as e:
            return error_response(e.failure)
        except Exception as e:
            return error_response(e)
        return await respond(body.stream, first, stream, lambda piece: {"text": piece},
                             lambda end: [{"done": True, **summary(end)}],
                             lambda text, end: {"answer": text, **summary(end)})

    def summary(end: AnswerEnd) -> dict:
        return {"documents": end.documents,
                "usage": {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
                          "total_tokens": end.prompt_tokens + end.completion_tokens},
                "timings": {k: round(v, 3) for k, v in end.timings.items()}, "replica": end.replica}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        try:
            refuse_unsupported(body)
            texts = [(m.role, message_text(m, i)) for i, m in enumerate(body.messages)]
            question = next((text for role, text in reversed(texts) if role == "user"), None)
            if not question:
                raise ValueError("messages: no user message to answer")
            stop = stop_sequences(body.stop)
            model = (await backend.info()).name
            if body.model not in (None, model, SERVICE_NAME, *aliases):
                raise UnknownModel(f"model {body.model!r} is not served here (GET /v1/models lists it)")
            max_tokens = body.max_completion_tokens or body.max_tokens or 128
            sampling = SamplingConfig(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p)
            first, stream = await start(AnswerRequest(body.documents, question, sampling, body.seed or 0, "query",
                                                      stop))
        except Failed as e:
            return error_response(e.failure)
        except Exception as e:
            return error_response(e)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def usage(end: AnswerEnd) -> dict:
            return summary(end)["usage"]

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return {**out, "usage": None} if include_usage else out

        def closing(end: AnswerEnd) -> list[dict]:
            last = [chunk({}, end.finish_reason)]
            if include_usage:  # OpenAI's shape: one more chunk, no choices, the usage
                last.append({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": usage(end)})
            return last

        def completion(text: str, end: AnswerEnd) -> dict:
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": end.finish_reason}],
                    "usage": usage(end), "timings": summary(end)["timings"]}

        return await respond(body.stream, first, stream, lambda piece: chunk({"role": "assistant", "content": piece}),
                             closing, completion)

    @app.get("/v1/models")
    async def models():
        info = await backend.info()
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0,
                                            "owned_by": "ctxtree", "fingerprint": info.fingerprint}]}

    def reply(out: dict | Failure):
        return error_response(out) if isinstance(out, Failure) else out

    @app.get("/v1/documents/{doc_id:path}")
    async def document(doc_id: str):
        return reply(await backend.document(doc_id))

    @app.post("/v1/prewarm")
    async def prewarm(body: DocumentsRequest):
        return reply(await backend.prewarm(body.documents))

    @app.get("/healthz")
    async def healthz():
        info = await backend.info()
        return {"status": "ok", "model": info.name, "fingerprint": info.fingerprint}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
