"""The FastAPI application: OpenAI's /v1/models, /v1/completions, /v1/chat/completions (streamed
as server-sent events or not), /health, /metrics; the API key, the body-size limit and the
access log are one ASGI layer around it (gate.py)."""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ringllm.checkpoint.errors import RingllmError
from ringllm.checkpoint.text import TextCodec
from ringllm.workers.engine import CANCELLED, ERROR, RequestStats
from ringllm.workers.engine import Request as EngineRequest
from ringllm.serve.gate import Gate
from ringllm.serve.logprobs import chat_logprobs, completion_logprobs
from ringllm.serve.metrics import metrics_response
from ringllm.serve.requests import (ApiError, GenerationParams, bad, chat_messages, completion_prompt,
                                    generation_params)
from ringllm.serve.runner import UNAVAILABLE, EngineRunner, Unavailable
from ringllm.serve.text import StopTextStream, chat_ids

DISCONNECT_POLL_S = 0.5     # how often a non-streamed request checks that its client is still there
_DIRECTORIES = re.compile(r"(?<![\w.])(?:/[\w.+@~-]+)+/")     # /a/b/ of /a/b/file


def public(text: str) -> str:
    """An error text as clients see it: files by their name, without the server's directories."""
    return _DIRECTORIES.sub("", text)


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_context: int
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    drain_s: float = 30.0          # SIGTERM: in-flight requests get this long before they are cancelled
    allowed_hosts: tuple[str, ...] | None = ()     # Host names besides loopback ones; None: any (gate.py)
    allowed_origins: tuple[str, ...] = ()          # browser Origins allowed; none by default
    body_timeout_s: float = 30.0   # a body not all received by then is 408 (a slow client holds no connection)


@dataclass
class Outcome:
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list = field(default_factory=list)          # TokenLogprob of each token in the text
    prompt_logprobs: list = field(default_factory=list)   # the prompt's (echo)
    stats: RequestStats | None = None     # the engine's passes and drafts (its finish event)

    def usage(self) -> dict:
        """OpenAI's usage; with the engine's counts, the drafts as OpenAI reports predicted
        outputs (completion_tokens_details) and the extension `ringllm`: decode passes and
        tokens per pass."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        s = self.stats
        if s is not None:
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": s.accepted,
                                                  "rejected_prediction_tokens": s.drafted - s.accepted}
            # the first token comes from the prompt's pass: the decode passes give the rest
            usage["ringllm"] = {"passes": s.passes, "drafted": s.drafted, "accepted": s.accepted,
                                "tokens_per_pass": (self.completion_tokens - 1) / s.passes if s.passes else None}
        return usage


def create_app(runner: EngineRunner, codec: TextCodec, settings: ServeSettings):
    app = FastAPI(title="ringllm", docs_url=None, redoc_url=None, openapi_url=None)
    eos_ids = frozenset(codec.eos_ids)

    def unavailable() -> ApiError:
        return ApiError(503, public(runner.failure or "the engine stopped"), "server_error", code="engine_unavailable")

    def finish_error(finish: str) -> ApiError | None:
        """The error a request that ended this way answers, None for OpenAI's stop and length."""
        if finish == UNAVAILABLE:
            return unavailable()
        if finish == ERROR:
            return ApiError(500, "the engine failed while generating this request", "server_error",
                            code="engine_error")
        if finish == CANCELLED:     # by the drain (a client that left reads nothing)
            return ApiError(503, "the server shut down before the request finished", "server_error",
                            code="server_shutting_down")
        return None

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else None
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.get("/health")
    async def health():
        if runner.failure is not None:
            return JSONResponse({"status": "unavailable", "reason": public(runner.failure)}, status_code=503)
        if runner.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        stalled = runner.stalled()
        if stalled is not None:
            return JSONResponse({"status": "stalled", "reason": stalled}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, content_type = metrics_response(runner)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist", code="model_not_found")
        return model_card()

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ringllm",
                "max_model_len": settings.max_context}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        params = generation_params(body, chat=False)
        prompt = completion_prompt(body)
        # a 4 MiB prompt takes a second to tokenize: off the event loop, which serves every stream
        ids = list(prompt) if isinstance(prompt, list) else await asyncio.to_thread(codec.encode, prompt, chat=False)
        if isinstance(prompt, list) and not 0 <= min(ids) <= max(ids) < codec.tokenizer.get_vocab_size(True):
            raise bad("prompt holds a token id outside the vocabulary", "prompt")
        check_logit_bias(params)
        echoed = prompt if isinstance(prompt, str) else codec.decode(ids)
        return await respond(request, "cmpl", "text_completion", ids, params, chat=False,
                             echoed=echoed if params.echo else "")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        params = generation_params(body, chat=True)
        messages = chat_messages(body)
        try:   # off the event loop, as for completions
            ids = await asyncio.to_thread(chat_ids, codec, messages)
        except RingllmError as err:
            raise bad(public(str(err)), "messages") from None
        check_logit_bias(params)
        return await respond(request, "chatcmpl", "chat.completion", ids, params, chat=True)

    async def read_json(request: Request) -> dict:
        # the gate refused a too-large Content-Length; a chunked body is counted as it arrives
        chunks, size = [], 0

        async def receive_all():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_body_bytes:
                    raise ApiError(413, f"request body over the limit of {settings.max_body_bytes} bytes",
                                   code="body_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive_all(), settings.body_timeout_s)
        except ClientDisconnect:    # gone before its body arrived: nobody reads this answer
            raise ApiError(499, "the client closed the connection before sending its body") from None
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                           code="body_timeout") from None
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as err:
            raise bad(f"the body is not valid JSON ({err})") from None
        except RecursionError:      # json's decoder recurses once per nesting level
            raise bad("the body nests deeper than the JSON reader allows") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        name = body.get("model")
        if name is not None and name != settings.model_name:
            raise ApiError(404, f"model {name!r} does not exist (this server serves {settings.model_name!r})",
                           param="model", code="model_not_found")
        return body

    def check_logit_bias(params: GenerationParams) -> None:
        vocab = codec.tokenizer.get_vocab_size(True)
        outside = [t for t, _ in params.sampling.logit_bias if t >= vocab]
        if outside:
            raise bad(f"logit_bias names token {outside[0]}, outside the vocabulary of {vocab}", "logit_bias")

    def admit(ids: list[int], params: GenerationParams, prefix: str):
        """Checks the prompt against the context, then hands the request to the runner."""
        max_tokens = check_room(ids, params)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        try:
            queue = runner.submit(EngineRequest(rid, tuple(ids), max_tokens, params.sampling, tuple(eos_ids),
                                          params.logprobs, params.echo and params.logprobs is not None, params.draft))
        except Unavailable as err:
            raise ApiError(503, public(str(err)), "server_error", code=err.code) from None
        except RingllmError as err:
            raise bad(public(str(err))) from None
        return rid, queue

    def check_room(ids: list[int], params: GenerationParams) -> int:
        """The request's max_tokens, once the prompt and it fit the context."""
        if not ids:
            raise bad("the prompt is empty (no tokens)", "prompt")
        room = settings.max_context - len(ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if room < 1 or max_tokens > room:
            raise bad(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the context of "
                      f"{settings.max_context} tokens", "max_tokens" if room >= 1 else "prompt",
                      "context_length_exceeded")
        return max_tokens

    async def pieces(rid: str, queue: asyncio.Queue, prompt_len: int, params: GenerationParams, outcome: Outcome,
                     request: Request | None):
        """The request's text as it is decoded; sets outcome at its end. Leaving early (client
        gone, stop string) cancels the request in the engine, which frees its KV rows."""
        text = StopTextStream(codec, list(params.stop))
        received, next_poll = 0, time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                if request is None:
                    event = await queue.get()
                else:   # not streamed: nothing is sent until the end, so look for a disconnect
                    try:
                        event = await asyncio.wait_for(queue.get(), max(0.0, next_poll - time.monotonic()))
                    except asyncio.TimeoutError:
                        event = None
                    if time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + DISCONNECT_POLL_S
                        if await request.is_disconnected():
                            return
                    if event is None:
                        continue
                outcome.prompt_logprobs += event.prompt_logprobs
                if event.token is not None:
                    received += 1
                    if event.token not in eos_ids:
                        if event.logprob is not None:
                            outcome.logprobs.append(event.logprob)
                        piece = text.push(event.token)
                        if piece:
                            yield piece
                if text.stopped:
                    outcome.finish, outcome.prompt_tokens, outcome.completion_tokens = "stop", prompt_len, received
                    return
                if event.finish is not None:
                    piece = text.flush()
                    if piece:
                        yield piece
                    outcome.finish, outcome.stats = event.finish, event.stats
                    outcome.prompt_tokens = event.prompt_tokens or prompt_len
                    outcome.completion_tokens = event.completion_tokens or received
                    return
        finally:
            runner.cancel(rid)     # a no-op once its finish event came (the runner forgot the id)

    async def respond(request: Request, prefix: str, kind: str, ids: list[int], params: GenerationParams, chat: bool,
                      echoed: str = ""):
        created = int(time.time())
        if params.max_tokens == 0 and params.logprobs is None:    # echo alone: nothing for the engine to do
            check_room(ids, params)
            return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": created,
                    "model": settings.model_name, "usage": Outcome(prompt_tokens=len(ids)).usage(),
                    "choices": [{"index": 0, "text": echoed, "logprobs": None, "finish_reason": "length"}]}
        rid, queue = admit(ids, params, prefix)
        outcome = Outcome()
        if params.stream:
            return EventSourceResponse(stream(rid, queue, created, ids, params, outcome, chat), ping=15,
                                       shutdown_grace_period=settings.drain_s + 5.0)
        parts = [piece async for piece in pieces(rid, queue, len(ids), params, outcome, request)]
        if outcome.finish is None:      # the client went away: nobody reads this
            return Response(status_code=499)
        error = finish_error(outcome.finish)
        if error is not None:
            raise error
        text = "".join(parts)
        logprobs = None
        if params.logprobs is not None:
            logprobs = (chat_logprobs(codec, outcome.logprobs) if chat else
                        completion_logprobs(codec, outcome.prompt_logprobs + outcome.logprobs))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                   "finish_reason": outcome.finish} if chat else
                  {"index": 0, "text": echoed + text, "logprobs": logprobs, "finish_reason": outcome.finish})
        return {"id": rid, "object": kind, "created": created, "model": settings.model_name,
                "choices": [choice], "usage": outcome.usage()}

    async def stream(rid, queue, created, ids, params: GenerationParams, outcome: Outcome, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> dict:
            return {"data": json.dumps({"id": rid, "object": kind, "created": created, "model": settings.model_name,
                                        "choices": choices, **extra})}

        text_offset = 0

        def choice(piece: str | None, finish: str | None, first: bool = False) -> dict:
            nonlocal text_offset
            # the logprobs of the tokens received since the last chunk (a stop string may hold text back)
            entries, outcome.logprobs = outcome.logprobs, []
            logprobs = None
            if params.logprobs is not None and not first:
                logprobs = chat_logprobs(codec, entries) if chat else completion_logprobs(codec, entries, text_offset)
            text_offset += len(piece or "")
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}

        try:
            if chat:
                yield chunk([choice(None, None, first=True)])
            async for piece in pieces(rid, queue, len(ids), params, outcome, None):
                yield chunk([choice(piece, None)])
        finally:
            runner.cancel(rid)     # the client went away before the first piece
        error = finish_error(outcome.finish)
        if error is not None:
            yield {"data": json.dumps(error.body())}
        else:
            yield chunk([choice(None, outcome.finish)])
            if params.include_usage:
                yield chunk([], usage=outcome.usage())
        yield {"data": "[DONE]"}

    return Gate(app, settings.api_key, settings.max_body_bytes, settings.allowed_hosts, settings.allowed_origins)
