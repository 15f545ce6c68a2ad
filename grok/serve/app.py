"""The FastAPI application: OpenAI's completion and chat endpoints, models, health and
metrics, over a `Worker` that owns the device.

Handlers parse and check a request (`protocol`), turn it into engine requests (one per
prompt and choice), take room from the admission counter, hand them to the worker and
relay its events as one JSON response or as server-sent events. Every failure is an
OpenAI-shaped error: a `GrokError` or `ApiError` says what the client got wrong (4xx);
anything else is logged with its traceback and answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from grok.engine.request import Completion, Event, PromptLogprobs
from grok.engine.request import Request as EngineRequest
from grok.errors import GrokError
from grok.serve import protocol
from grok.serve.chat import ChatTemplate
from grok.serve.metrics import CONTENT_TYPE, Metrics
from grok.serve.protocol import ApiError, Sampling, bad_request
from grok.serve.worker import Admission, Failure, Ticket, Worker
from grok.tokenizer import Tokenizer

log = logging.getLogger("grok.serve")

RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What the handlers need besides the worker."""

    model_name: str
    tokenizer: Tokenizer
    eos_id: int
    max_seq_len: int
    api_key: str | None = None
    chat_template: ChatTemplate | None = None
    max_body_bytes: int = 4 << 20


class Service:
    """The server's shared state: config, worker, admission, metrics, and whether it is
    draining (after SIGTERM: running requests finish, new ones get 503)."""

    def __init__(self, config: ServerConfig, worker: Worker, metrics: Metrics):
        self.config, self.worker, self.metrics = config, worker, metrics
        self.admission: Admission = worker.admission
        self.texts = protocol.TokenTexts(config.tokenizer, config.eos_id)
        self.draining = False
        self._grammars_lock = threading.Lock()

    def grammars(self):
        """The model's grammar compiler, made on the first structured request (seconds:
        xgrammar imports PyTorch), so call it off the event loop."""
        with self._grammars_lock:
            return self.worker.engine.grok.grammars

    @property
    def state(self) -> str:
        """One of "loading", "ready", "draining", "stopped" or "failed"."""
        if self.worker.state == "ready" and not self.worker.alive:
            return "failed"
        if self.worker.state != "ready":
            return self.worker.state
        return "draining" if self.draining else "ready"


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="grok1-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _install_error_handlers(app, service)
    cfg = service.config

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    def check_ready() -> None:
        state = service.state
        if state != "ready":
            what = {"loading": "the model is loading", "draining": "the server is shutting "
                    "down"}.get(state, f"the server is {state}")
            raise ApiError(503, what, type="service_unavailable", code=state,
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{cfg.model_name!r}", param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        state = service.state
        if state == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse(protocol.error_body(f"the server is {state}",
                                                "service_unavailable", code=state),
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": 0,
                "owned_by": "grok1-jax", "max_model_len": cfg.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> Response:
        check_key(request)
        check_model(name)
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request)
        check_ready()
        body = await _json_body(request, cfg.max_body_bytes)
        params = protocol.parse_completion(body)
        _log_unknown(body, protocol.COMPLETION_FIELDS)
        check_model(params.sampling.model)
        prompts = [list(p) if isinstance(p, tuple) else p for p in params.prompts]
        return await _run(service, request, prompts, params.sampling, _CompletionFormat(
            service, params.logprobs, params.echo, params.prompt_logprobs))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        check_key(request)
        check_ready()
        body = await _json_body(request, cfg.max_body_bytes)
        params = protocol.parse_chat(body)
        _log_unknown(body, protocol.CHAT_FIELDS)
        check_model(params.sampling.model)
        if cfg.chat_template is None:
            raise bad_request("Grok-1 is a base model with no chat template: this server was "
                              "started without --chat-template, so use /v1/completions, or "
                              "restart it with a template", "messages")
        prompt = cfg.chat_template.render(params.messages)
        return await _run(service, request, [prompt], params.sampling, _ChatFormat(
            service, params.top_logprobs if params.logprobs else None))

    return app


# --- running a request -------------------------------------------------------------------


async def _run(service: Service, http: Request, prompts: Sequence[str | list[int]],
               sampling: Sampling, fmt: _Format) -> Response:
    """Queues one engine request per prompt and choice (choice j of prompt i has index
    i * n + j, as OpenAI numbers them) and answers with their results."""
    capacity, count = service.admission.capacity, len(prompts) * sampling.n
    if count > capacity:
        raise bad_request(f"{len(prompts)} prompt(s) x n={sampling.n} is {count} sequences, "
                          f"more than this server holds at once ({capacity})", "n")
    grammar = await _compile(service, sampling)
    requests = _engine_requests(service.worker.engine, prompts, sampling, grammar)
    if not service.admission.try_take(len(requests)):
        service.metrics.rejected.labels("429").inc()
        raise ApiError(429, "the server is busy: its queue is full, try again shortly",
                       type="rate_limit_exceeded", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    ticket = Ticket(asyncio.get_running_loop(), len(requests))
    service.worker.submit(ticket, requests)
    prompt_tokens = sum(len(r.prompt_ids) for r in requests[:: sampling.n])
    if sampling.stream:
        return StreamingResponse(
            _stream(service, ticket, fmt, sampling, prompt_tokens),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    completions = await _collect(service, http, ticket)
    return JSONResponse(fmt.response(completions, prompt_tokens, sampling.n))


async def _compile(service: Service, sampling: Sampling):
    """The request's structure compiled (None without one): in the grammar compiler's own
    processes, so the device thread and other requests never wait for it."""
    spec = sampling.structure
    if spec is None:
        return None
    param = sampling.structure_field
    try:
        compiler = await asyncio.to_thread(service.grammars)
        return await asyncio.wrap_future(compiler.submit(spec))
    except GrokError as e:
        raise bad_request(f"{param}: {e}", param) from None


def _engine_requests(engine, prompts: Sequence[str | list[int]], sampling: Sampling,
                     grammar) -> list[EngineRequest]:
    """Checks and tokenizes each prompt once; its n choices differ only in their seeds."""
    out = []
    for i, prompt in enumerate(prompts):
        label = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        try:
            first = engine.make_request(prompt, sampling.settings(0), label=label,
                                        grammar=grammar)
        except GrokError as e:
            raise bad_request(str(e), "prompt") from None
        out.append(first)
        out += [dataclasses.replace(first, settings=sampling.settings(j))
                for j in range(1, sampling.n)]
    return out


async def _wait_for_disconnect(http: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message
    the server gets on this request is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _collect(service: Service, http: Request, ticket: Ticket) -> list[Completion]:
    """Every choice's completion; cancels them all if the client leaves first."""
    done: dict[int, Completion] = {}
    gone = asyncio.ensure_future(_wait_for_disconnect(http))
    try:
        while len(done) < ticket.count:
            get = asyncio.ensure_future(ticket.queue.get())
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise ApiError(499, "the client closed the connection")
            for index, item in get.result():
                if isinstance(item, Failure):
                    raise _failure_error(item)
                if item.completion is not None:
                    done[index] = item.completion
    finally:
        gone.cancel()
        if len(done) < ticket.count:
            service.worker.cancel(ticket)
    return [done[i] for i in range(ticket.count)]


async def _stream(service: Service, ticket: Ticket, fmt: _Format, sampling: Sampling,
                  prompt_tokens: int) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per choice and token (text held back for a possible
    stop string waits), each choice's last with its finish_reason, the usage chunk when
    asked for, then [DONE]. Closing the connection cancels the rest."""
    response_id, created = protocol.new_id(fmt.id_prefix), protocol.now()
    usage_field = {"usage": None} if sampling.include_usage else {}
    open_choices = set(range(ticket.count))
    completion_tokens = cached_tokens = 0
    try:
        out = [protocol.sse(c | usage_field) for c in fmt.opening(response_id, created,
                                                                     ticket.count)]
        if out:
            yield b"".join(out)
        while open_choices:
            out = []
            for index, item in await ticket.queue.get():
                if isinstance(item, Failure):
                    yield protocol.sse(_failure_error(item).body()) + protocol.DONE
                    return
                chunk = fmt.chunk(response_id, created, index, item)
                if chunk is not None:
                    out.append(protocol.sse(chunk | usage_field))
                if item.completion is not None:
                    open_choices.discard(index)
                    completion_tokens += len(item.completion.output_ids)
                    if index % sampling.n == 0:  # a prompt's first choice
                        cached_tokens += item.completion.cached_tokens
            if out:
                yield b"".join(out)
        if sampling.include_usage:
            yield protocol.sse(fmt.envelope(response_id, created, []) | {
                "usage": protocol.usage(prompt_tokens, completion_tokens, cached_tokens)})
        yield protocol.DONE
    finally:
        if open_choices:
            service.worker.cancel(ticket)


def _failure_error(failure: Failure) -> ApiError:
    kind = {400: "invalid_request_error", 503: "service_unavailable"}.get(
        failure.status, "internal_error")
    return ApiError(failure.status, failure.message, type=kind)


# --- response shapes of the two endpoints ------------------------------------------------


class _Format:
    """How one endpoint shapes its responses and chunks."""

    id_prefix: str
    object: str
    chunk_object: str

    def __init__(self, service: Service, top: int | None):
        self.service, self.top, self.model = service, top, service.config.model_name
        self._streams: dict[int, protocol.CompletionLogprobs] = {}

    def envelope(self, response_id: str, created: int, choices: list, chunk: bool = True
                 ) -> dict:
        return {"id": response_id, "object": self.chunk_object if chunk else self.object,
                "created": created, "model": self.model, "choices": choices}

    def response(self, completions: list[Completion], prompt_tokens: int, n: int) -> dict:
        """`n`: choices per prompt (each prompt's first reports its cached tokens)."""
        choices = [self.choice(i, c) for i, c in enumerate(completions)]
        return self.envelope(protocol.new_id(self.id_prefix), protocol.now(), choices,
                             chunk=False) | {
            "usage": protocol.usage(prompt_tokens,
                                    sum(len(c.output_ids) for c in completions),
                                    sum(c.cached_tokens for c in completions[::n]))}

    def opening(self, response_id: str, created: int, count: int) -> list[dict]:
        return []

    def choice(self, index: int, completion: Completion) -> dict:
        raise NotImplementedError

    def chunk(self, response_id: str, created: int, index: int, event: Event) -> dict | None:
        raise NotImplementedError


class _CompletionFormat(_Format):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, service: Service, top: int | None, echo: bool = False,
                 prompt_top: int | None = None):
        """`echo`: the prompt's text (and with `top`, its tokens' logprobs, the first
        null) come first; `prompt_top`: vLLM's `prompt_logprobs` field, with that many
        alternatives."""
        super().__init__(service, top)
        self.echo, self.prompt_top = echo, prompt_top

    def _prompt(self, scores: PromptLogprobs | None) -> tuple[str, dict | None]:
        """An echoed prompt's text and logprob entries ('' and None without echo)."""
        if not self.echo:
            return "", None
        text = self.service.texts.tokenizer.decode(scores.tokens)
        entries = None
        if self.top is not None:
            entries = protocol.CompletionLogprobs(self.service.texts, self.top).entries(
                scores.tokens, scores.logprobs, scores.top_alternatives, last=True)
        return text, entries

    def _extras(self, choice: dict, scores: PromptLogprobs | None) -> dict:
        if self.prompt_top is not None and scores is not None:
            choice["prompt_logprobs"] = protocol.vllm_prompt_logprobs(
                self.service.texts, scores, self.prompt_top)
        return choice

    def choice(self, index: int, c: Completion) -> dict:
        echoed, head = self._prompt(c.prompt_logprobs)
        logprobs = None
        if self.top is not None:
            logprobs = protocol.CompletionLogprobs(
                self.service.texts, self.top, offset=len(echoed)).entries(
                c.output_ids, c.output_logprobs, c.top_alternatives, last=True)
            if head is not None:
                logprobs = protocol.join_logprobs(head, logprobs)
        choice = protocol.completion_choice(index, c, logprobs)
        choice["text"] = echoed + choice["text"]
        return self._extras(choice, c.prompt_logprobs)

    def chunk(self, response_id: str, created: int, index: int, event: Event) -> dict | None:
        echoed, head = self._prompt(event.prompt_logprobs) \
            if event.prompt_logprobs is not None else ("", None)
        token = [] if event.token is None else [event.token]
        logprobs = None
        if self.top is not None:
            builder = self._streams.setdefault(
                index, protocol.CompletionLogprobs(self.service.texts, self.top,
                                                   offset=len(echoed)))
            logprobs = builder.entries(token, [event.logprob] * len(token),
                                       [event.top] * len(token), last=event.finished)
            if head is not None:
                logprobs = protocol.join_logprobs(head, logprobs)
        elif not event.text and not event.finished and not echoed:
            return None
        finish = None if event.completion is None else \
            protocol.FINISH_REASON[event.completion.finish_reason]
        return self.envelope(response_id, created, [self._extras(
            {"index": index, "text": echoed + event.text, "logprobs": logprobs,
             "finish_reason": finish}, event.prompt_logprobs)])


class _ChatFormat(_Format):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, c: Completion) -> dict:
        logprobs = None
        if self.top is not None:
            logprobs = protocol.chat_logprobs(self.service.texts, c.output_ids,
                                              c.output_logprobs, c.top_alternatives, self.top)
        return protocol.chat_choice(index, c, logprobs)

    def opening(self, response_id: str, created: int, count: int) -> list[dict]:
        """The role comes first, in a chunk of its own, as OpenAI sends it."""
        return [self.envelope(response_id, created, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]) for i in range(count)]

    def chunk(self, response_id: str, created: int, index: int, event: Event) -> dict | None:
        logprobs = None
        if self.top is not None:
            logprobs = protocol.chat_logprobs(self.service.texts, [event.token],
                                              [event.logprob], [event.top], self.top)
        elif not event.text and not event.finished:
            return None
        finish = None if event.completion is None else \
            protocol.FINISH_REASON[event.completion.finish_reason]
        delta = {"content": event.text} if event.text or not event.finished else {}
        return self.envelope(response_id, created, [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])


# --- requests and errors -----------------------------------------------------------------


async def _json_body(request: Request, limit: int) -> Any:
    """The parsed body: 413 past `limit` bytes (declared or sent), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise bad_request("the request body is not valid JSON") from None


def _log_unknown(body: dict, known: set[str]) -> None:
    unknown = protocol.unknown_fields(body, known)
    if unknown:
        log.info("ignoring unknown request fields: %s", ", ".join(unknown[:20]))


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    def answer(error: ApiError) -> JSONResponse:
        if error.status >= 400 and error.status not in (429, 499):
            service.metrics.rejected.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return answer(e)

    @app.exception_handler(GrokError)
    async def user_error(request: Request, e: GrokError) -> JSONResponse:
        return answer(bad_request(str(e)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = (f"no such path: {request.method} {request.url.path}" if e.status_code == 404
                   else str(e.detail))
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return answer(ApiError(e.status_code, message, type=kind,
                               headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return answer(bad_request(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
        return answer(ApiError(500, "internal server error", type="internal_error"))
