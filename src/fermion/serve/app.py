"""`fermion serve`: an OpenAI-compatible HTTP server over the engine, and a chat page at `/`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events when
`stream` is true, ending with `data: [DONE]`), GET /health, GET / (the chat page), GET /openapi.json (the request
bodies and errors of each route, schema.py). Every request is checked in full before any work: the body's type and
size (guard.py), the body parsed and validated, the model name matched, the prompt rendered and tokenized (in a
worker thread, after a check of its length in bytes), and the prompt plus max_tokens held against the context
window; anything wrong is answered 4xx in OpenAI's error format and the engine never sees it:

    400 invalid_request_error  malformed JSON, a wrong type or value, an unsupported parameter, a prompt that
                               does not fit the context (code context_length_exceeded)
    401 invalid_request_error  a missing or wrong bearer key when the server has one (code invalid_api_key)
    404 invalid_request_error  an unknown model (code model_not_found) or path
    405 invalid_request_error  a method the path does not answer (with an Allow header)
    413 invalid_request_error  a body over the size limit (code request_too_large)
    415 invalid_request_error  a POST body not sent as application/json
    429 rate_limit_error       the waiting line is full
    500 server_error           generation itself failed (of one choice: the others in its step go on)

Generation goes through the continuous-batching scheduler (scheduler.py). A streaming client that disconnects has
its sequences cancelled at once; a non-streaming one is checked while it waits. Tool calls are tools.py's,
log-probabilities logprobs.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fermion import __version__
from fermion.chat.templates import ChatTemplate, TemplateError
from fermion.infer.engine import Engine, SamplingParams
from fermion.serve.guard import Guard
from fermion.serve.logprobs import chat_logprobs, completion_logprobs
from fermion.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Sampling,
    describe_validation_error,
)
from fermion.serve.scheduler import Busy, Event, Job, Scheduler
from fermion.serve.schema import describe
from fermion.serve.tools import ToolPlan, openai_calls

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    template: ChatTemplate
    api_key: str | None = None
    max_waiting: int = 256
    max_request_bytes: int | None = None  # None: derived from the context and the tokenizer (guard.py)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, config: ServerConfig, engine_thread: bool = True) -> FastAPI:
    """The server's FastAPI app. With `engine_thread`, the scheduler's loop runs in a thread that starts and stops
    with the app; without, the caller runs `app.state.scheduler.run()` itself (as `serve` does)."""
    scheduler = Scheduler(engine, max_waiting=config.max_waiting)
    tokenizer = engine.tokenizer
    guard = Guard(tokenizer, engine.max_seq, config.max_request_bytes)
    fingerprint = f"fermion-{__version__}"

    async def lifespan(app: FastAPI):
        if engine_thread:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="fermion", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.scheduler, app.state.config, app.state.guard = scheduler, config, guard

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = describe(FastAPI.openapi(app), config.model_name, engine.max_seq)
        return app.openapi_schema

    app.openapi = openapi

    # ------------------------------------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        message, param = describe_validation_error(err.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.url.path} does not answer {request.method}; it answers "
                        f"{(err.headers or {}).get('Allow', 'other methods')}"}.get(err.status_code, str(err.detail))
        code = "unknown_url" if err.status_code == 404 else None
        return JSONResponse(APIError(err.status_code, message, code=code).body(), status_code=err.status_code,
                            headers=err.headers)

    @app.middleware("http")
    async def bearer_key(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), config.api_key):
                what = "no API key was given" if not given else "the API key is not valid"
                return JSONResponse(APIError(401, f"{what}; send it as 'Authorization: Bearer KEY'",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    # --------------------------------------------------------------------------------------------- helpers

    async def parse(request: Request, kind: type[Sampling]) -> Sampling:
        body = await guard.body(request)
        try:
            parsed = kind.model_validate_json(body)
        except ValidationError as err:
            errors = err.errors()
            if errors and errors[0]["type"] == "json_invalid":
                raise APIError(400, f"the request body is not valid JSON: {errors[0]['ctx'].get('error', '')}") \
                    from None
            if errors and errors[0]["type"] == "model_type":
                raise APIError(400, "the request body must be a JSON object") from None
            message, param = describe_validation_error(errors)
            raise APIError(400, message, param=param) from None
        if parsed.model != config.model_name:
            raise APIError(404, f"the model '{parsed.model}' does not exist; this server has '{config.model_name}'",
                           param="model", code="model_not_found")
        return parsed

    def fit(prompt: list[int], limit: int | None, default: int | None, field: str) -> int:
        """max_tokens for a prompt, refusing what cannot fit the context window."""
        context = engine.max_seq
        if not prompt:
            raise APIError(400, "the prompt is empty; it needs at least one token", param=field)
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {context} tokens, and the prompt has "
                                f"{len(prompt)}; shorten it", param=field, code="context_length_exceeded")
        if limit is not None and limit > room:
            raise APIError(400, f"this model's maximum context length is {context} tokens; you asked for "
                                f"{len(prompt) + limit} ({len(prompt)} in the prompt, {limit} to generate); lower "
                                f"max_tokens to at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return limit if limit is not None else min(default or room, room)

    def sampling(request: Sampling, max_tokens: int, extra_stops: list[str], index: int,
                 logprobs: int | None) -> SamplingParams:
        for field, ids in (("stop_token_ids", request.stop_token_ids or []), ("logit_bias", request.token_bias)):
            bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise APIError(400, f"{field}: {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                               param=field)
        # Each choice its own draw, reproducibly; modulo 2^64 as torch takes seeds, so seed + index cannot overflow.
        seed = None if request.seed is None else (request.seed + index) % 2**64
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
            top_k=max(request.top_k, 0), top_p=1.0 if request.top_p is None else request.top_p,
            min_p=request.min_p, repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            stop=[*request.stops, *extra_stops], stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos, seed=seed, logit_bias=request.token_bias, logprobs=logprobs)

    def tokens(prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (a worker thread's work: tokenizing a long text takes a while)."""
        if isinstance(prompt, str):
            guard.check_length(prompt, "prompt")
            return tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                           param="prompt")
        return list(prompt)

    def chat_tokens(request: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        """The conversation (and the tools it offers) rendered through the chat template and tokenized (a worker
        thread's work)."""
        try:
            text = config.template.render(request.conversation(), tokenizer, add_generation_prompt=True,
                                          tools=plan.rendered)
        except TemplateError as err:
            raise APIError(400, f"messages: {err}", param="messages") from None
        guard.check_length(text, "messages")
        return tokenizer.encode(text)

    def json_grammar(request: ChatCompletionRequest, plan: ToolPlan):
        """The JSON Schema grammar the answer decodes under: a forced tool call's, or response_format's (compiled in
        a worker thread: a client's schema can be large)."""
        fmt, schema, field = request.response_format, plan.schema, "tools"
        if schema is None and fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
            field = "response_format"
        if schema is None:
            return None
        from fermion.infer.constrain import JsonSchemaGrammar

        try:
            return JsonSchemaGrammar(tokenizer, schema)
        except (ValueError, ImportError) as err:
            raise APIError(400, f"{field}: {err}", param=field) from None

    def submit(jobs: list[Job]) -> None:
        try:
            scheduler.submit(jobs)
        except Busy as err:
            raise APIError(429, str(err), type="rate_limit_error", code="server_busy") from None

    async def collect(request: Request, queue: asyncio.Queue, jobs: list[Job]) -> list[Event]:
        """Wait for every job's final event, cancelling them all the moment the client goes away."""

        async def watch() -> None:  # the body is read, so the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait(None)

        watcher = asyncio.create_task(watch())
        finals: dict[int, Event] = {}
        try:
            while len(finals) < len(jobs):
                event = await queue.get()
                if event is None:
                    return []
                if event.error:
                    raise APIError(500, event.error)
                if event.done is not None:
                    finals[event.index] = event
        finally:
            watcher.cancel()
            scheduler.cancel(jobs)  # finished jobs are ignored; the rest stop
        return [finals[i] for i in sorted(finals)]

    def usage(prompt_tokens: int, completions: list) -> dict:
        generated = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated}

    async def pending(queue: asyncio.Queue) -> list[Event]:
        """The next event, and every one already behind it, with each choice's consecutive texts joined: a client
        that keeps up gets a chunk per token; one that falls behind (or a busy server) gets fewer, longer chunks
        instead of a growing backlog."""
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        merged: list[Event] = []
        for event in events:
            last = next((e for e in reversed(merged) if e.index == event.index), None)
            if last is not None and last.done is None and last.error is None and event.error is None:
                last.text += event.text
                last.done = event.done
                if last.logprobs is not None:
                    last.logprobs += event.logprobs or []
            else:
                merged.append(event)
        return merged

    def stream_events(queue: asyncio.Queue, jobs: list[Job], first: list[dict], frames: Callable[[Event], list[dict]],
                      usage_frame: Callable[[dict], dict], prompt_tokens: int,
                      include_usage: bool) -> EventSourceResponse:
        """SSE: the opening chunks, an event's chunks as `frames` makes them (its text; a closing chunk when it ends
        its choice), usage, [DONE]."""

        async def events() -> AsyncIterator[dict]:
            done: list = []
            try:
                for opening in first:
                    yield {"data": json.dumps(opening)}
                while len(done) < len(jobs):
                    for event in await pending(queue):
                        if event.error:
                            scheduler.cancel(jobs)
                            yield {"data": json.dumps(APIError(500, event.error).body())}
                            return
                        for frame in frames(event):
                            yield {"data": json.dumps(frame)}
                        if event.done is not None:
                            done.append(event.done)
                if include_usage:
                    yield {"data": json.dumps(usage_frame(usage(prompt_tokens, done)))}
                yield {"data": "[DONE]"}
            finally:  # the client left (the generator is cancelled) or everything was sent: free the slots
                scheduler.cancel(jobs)

        return EventSourceResponse(events(), ping=15, sep="\n")

    # ------------------------------------------------------------------------------------------- endpoints

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "context_length": engine.max_seq, **scheduler.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != config.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{config.model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": config.created, "owned_by": "fermion",
                "max_model_len": engine.max_seq}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse(request, CompletionRequest)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = await asyncio.to_thread(lambda: [tokens(p) for p in prompts])
        limits = [fit(ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt") for ids in encoded]
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(p * body.n + j, ids, sampling(body, limit, [], j, body.logprobs), queue, loop)
                for p, (ids, limit) in enumerate(zip(encoded, limits, strict=True)) for j in range(body.n)]
        echoes = [tokenizer.decode(ids) if body.echo else "" for ids in encoded]
        prompt_tokens = sum(map(len, encoded))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        submit(jobs)

        def frame(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": config.model_name,
                    "system_fingerprint": fingerprint, "choices": choices, **extra}

        def choice(index: int, text: str, finish_reason: str | None, logprobs=None) -> dict:
            return {"index": index, "text": text, "logprobs": completion_logprobs(tokenizer, logprobs),
                    "finish_reason": finish_reason}

        def frames(event: Event) -> list[dict]:
            out = [frame([choice(event.index, event.text, None, event.logprobs)])] if event.text or event.logprobs \
                else []
            return out + [frame([choice(event.index, "", event.done.finish_reason)])] if event.done else out

        if body.stream:
            first = [frame([choice(job.index, echoes[job.index // body.n], None)]) for job in jobs] if body.echo \
                else []
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_events(queue, jobs, first, frames, lambda use: frame([], usage=use), prompt_tokens,
                                 include_usage)
        finals = await collect(request, queue, jobs)
        completions = [event.done for event in finals]
        return frame([choice(event.index, echoes[event.index // body.n] + event.done.text, event.done.finish_reason,
                             event.done.logprobs) for event in finals], usage=usage(prompt_tokens, completions))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        plan = ToolPlan.of(body)
        prompt = await asyncio.to_thread(chat_tokens, body, plan)
        limit = fit(prompt, body.limit, None, "messages")
        grammar = await asyncio.to_thread(json_grammar, body, plan)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [Job(j, prompt, sampling(body, limit, config.template.stop_strings, j, body.top), queue, loop,
                    grammar.constraint() if grammar else None) for j in range(body.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        submit(jobs)

        def frame(kind: str, choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": kind, "created": created, "model": config.model_name,
                    "system_fingerprint": fingerprint, "choices": choices, **extra}

        def delta(index: int, content: dict, finish_reason: str | None = None, logprobs=None) -> dict:
            return {"index": index, "delta": content, "logprobs": chat_logprobs(tokenizer, logprobs),
                    "finish_reason": finish_reason}

        if body.stream:
            chunk, readers = "chat.completion.chunk", [plan.reader() for _ in range(body.n)]

            def frames(event: Event) -> list[dict]:
                i, reader = event.index, readers[event.index]
                content, calls = reader.feed(event.text), []
                if event.done:
                    rest, calls = reader.finish()
                    content += rest
                out = [frame(chunk, [delta(i, {"content": content} if content else {}, None, event.logprobs)])] \
                    if content or event.logprobs else []
                if calls:
                    out.append(frame(chunk, [delta(i, {"tool_calls": openai_calls(calls, streamed=True)})]))
                if event.done:
                    out.append(frame(chunk, [delta(i, {}, "tool_calls" if calls else event.done.finish_reason)]))
                return out

            # With tools in play the answer may be calls only, so the opening leaves content null, as OpenAI's does.
            opening = {"role": "assistant", "content": None if plan.rendered else ""}
            first = [frame(chunk, [delta(j, opening)]) for j in range(body.n)]
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_events(queue, jobs, first, frames, lambda use: frame(chunk, [], usage=use), len(prompt),
                                 include_usage)
        finals = await collect(request, queue, jobs)
        choices = []
        for event in finals:
            message, called = plan.message(event.done.text)
            choices.append({"index": event.index, "message": message,
                            "logprobs": chat_logprobs(tokenizer, event.done.logprobs),
                            "finish_reason": "tool_calls" if called else event.done.finish_reason})
        return frame("chat.completion", choices, usage=usage(len(prompt), [event.done for event in finals]))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("fermion.serve").joinpath("static/chat.html").read_text("utf-8"))

    return app


def serve(engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server until Ctrl-C: uvicorn in a thread, the engine loop in this one.

    The engine runs where the model was loaded. PyTorch's OpenMP pool belongs to the thread that first used it;
    decoding in a second thread after the first has used torch measured 1.4x slower on a 2-core CPU (a 1024 x 1024
    matmul loop: 1.36 s vs 0.94 s), the two pools' workers contending for the cores.
    """
    import signal
    import threading

    import uvicorn

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop ends it as Ctrl-C does
    app = create_app(engine, config, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="fermion-http", daemon=True)
    http.start()
    try:
        app.state.scheduler.run(alive=lambda: http.is_alive() and not server.should_exit)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=15)
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (see the message above)")
