"""OpenAI request bodies -> validated generation parameters, and the OpenAI error shape."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ringllm.workers.sampling import MAX_TOP_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000      # a stop string's length at most (what the stream may hold back of its text)
DEFAULT_COMPLETION_TOKENS = 16     # /v1/completions' default in the OpenAI API
MAX_LOGIT_BIAS = 300               # entries of logit_bias (it travels to the GPU process in parts)
# Fields that would change the output and that ringllm does not implement: 400 naming the field
# rather than a 200 with output the client did not ask for. An empty value ([] / "" / "none") is
# the same as not sending it. Harmless fields (user, metadata, store, parallel_tool_calls,
# service_tier, prompt_cache_key, safety_identifier) are accepted and ignored.
# Fields that would change the output, which this server does not do: refused unless absent or
# the value that asks for nothing (a client's default, e.g. `tools: []`)
REFUSED_FIELDS = {"tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "suffix": "",
                  "audio": None, "web_search_options": None, "reasoning_effort": None}


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None          # None: what the context leaves (chat's default)
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool             # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None     # top alternatives per token (0..20); None: no logprobs
    echo: bool = False              # /v1/completions: the prompt's text (and logprobs) before the completion
    draft: bool = True              # ringllm_draft (an extension): false declines the server's --draft


def _number(body: dict, name: str, default, lo: float, hi: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if not math.isfinite(value):       # Python's json reads NaN and Infinity
        raise bad(f"{name} must be a finite number, got {value}", name)
    if value < lo or value > hi:
        raise bad(f"{name} must be in [{lo}, {hi}], got {value}", name)
    return value


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise bad(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise bad(f"{name} must be <= {hi}, got {value}", name)
    return value


def _refuse_unsupported(body: dict) -> None:
    for name, nothing in REFUSED_FIELDS.items():
        if body.get(name) is not None and body[name] != nothing:
            raise bad(f"{name} is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad(f"response_format {fmt!r} is not supported by this server (only {{'type': 'text'}})",
                  "response_format")
    if body.get("modalities") not in (None, ["text"]):
        raise bad("modalities: only ['text'] is supported by this server", "modalities")


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: logprobs true/false and top_logprobs 0..20; completions: logprobs 0..20."""
    if not chat:
        logprobs = _integer(body, "logprobs", lo=0)
        if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
            raise bad(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "logprobs")
        return logprobs
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad(f"logprobs must be true or false, got {wanted!r}", "logprobs")
    top = _integer(body, "top_logprobs", lo=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
    if top is not None and not wanted:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """{"token id": bias in [-100, 100]} -> sorted (id, bias) pairs (ids checked against the
    vocabulary by the app, which knows it)."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(value)}", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        bias = float(_number({"logit_bias": bias}, "logit_bias", 0.0, -100.0, 100.0))   # finite, in range
        pairs.append((int(key), bias))
    return tuple(sorted(pairs))


# An extension field: false runs the request without the server's draft (--draft), one token a pass
DRAFT_FIELD = "ringllm_draft"


def generation_params(body: dict, chat: bool) -> GenerationParams:
    _refuse_unsupported(body)
    n = _integer(body, "n", lo=1)
    if n not in (None, 1):
        raise bad(f"n must be 1 (one completion per request), got {n}", "n")
    best_of = _integer(body, "best_of", lo=1)
    if best_of not in (None, 1):
        raise bad(f"best_of must be 1, got {best_of}", "best_of")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise bad(f"echo must be true or false, got {echo!r}", "echo")
    if echo and chat:
        raise bad("echo is a /v1/completions field", "echo")
    max_tokens = _integer(body, "max_tokens", lo=1 if not echo else 0)
    if chat:    # both checked: a client may send both (then max_tokens counts)
        completion_tokens = _integer(body, "max_completion_tokens", lo=1)
        max_tokens = completion_tokens if max_tokens is None else max_tokens
    if not chat and max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_TOKENS
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)      # 0: the top token only, as OpenAI takes it
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    logprobs = _logprobs(body, chat)
    seed = _integer(body, "seed", SEED_MIN, SEED_MAX)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"a stop string has {max(map(len, stop))} characters, over the limit of {MAX_STOP_CHARS}", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    if stream and echo:
        raise bad("echo is not supported with stream", "echo")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise bad(f"stream_options must be an object, got {options!r}", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad(f"stream_options.include_usage must be true or false, got {include_usage!r}", "stream_options")
    draft = body.get(DRAFT_FIELD)
    if draft is not None and not isinstance(draft, bool):
        raise bad(f"{DRAFT_FIELD} must be true or false, got {draft!r}", DRAFT_FIELD)
    sampling = SamplingParams(float(temperature), float(top_p), 0, seed, float(presence), float(frequency),
                              _logit_bias(body))
    return GenerationParams(max_tokens, sampling, tuple(stop), stream, bool(include_usage),
                            logprobs, bool(echo), draft is not False)


def completion_prompt(body: dict) -> str | list[int]:
    """/v1/completions' prompt: a string or a token-id list, or a list holding one of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise bad("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def chat_messages(body: dict) -> list[dict]:
    from ringllm.serve.text import ROLES, message_text

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] needs a role, one of {', '.join(ROLES)}", "messages")
        try:
            out.append({"role": m["role"], "content": message_text(m.get("content", ""))})
        except ValueError as err:
            raise bad(f"messages[{i}].content: {err}", "messages") from None
    return out
