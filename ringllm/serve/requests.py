"""OpenAI request bodies -> validated generation parameters, and the OpenAI error shape."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ringllm.workers.sampling import SEED_MAX, SEED_MIN, SamplingParams

MAX_STOP_STRINGS = 4
DEFAULT_COMPLETION_TOKENS = 16     # /v1/completions' default in the OpenAI API


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


def generation_params(body: dict, chat: bool) -> GenerationParams:
    n = _integer(body, "n", lo=1)
    if n not in (None, 1):
        raise bad(f"n must be 1 (one completion per request), got {n}", "n")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of must be 1", "best_of")
    max_tokens = _integer(body, "max_tokens", lo=1)
    if chat and max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", lo=1)
    if not chat and max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_TOKENS
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)      # 0: the top token only, as OpenAI takes it
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
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return GenerationParams(max_tokens, SamplingParams(float(temperature), float(top_p), 0, seed),
                            tuple(stop), stream, bool(options.get("include_usage")))


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
