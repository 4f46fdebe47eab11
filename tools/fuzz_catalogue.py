"""The hostile requests of the serve fuzzer (tools/serve_fuzz.py): a catalogue of mutations of a
valid OpenAI request, each drawn by a seeded random.Random into a Probe, the raw bytes sent to
the server over a socket, and what the server may answer.

A probe either must be refused (a 4xx: a value the API does not take, a body that is not a JSON
object, a wrong Content-Type, a foreign Host or Origin, a body over the limit, ...) or may be
accepted (a value that happens to be valid, an unknown field, a chunked body, ...): then the
server answers 4xx or 200 with a well-formed completion. Three mutations hang up on purpose
(mid-body, right after sending, mid-stream); the checks after the run (the engine idle, its KV
cache empty) judge what they left.

The per-field oracle (`acceptable`) is the API's contract as README.md's serving section and the
OpenAI reference give it; it is deliberately lenient where the contract is open (an unknown
field, `user`, stream_options' content, a long stop string, a 100 KiB header), strict where a value is invalid (NaN, a
temperature of 3, n=2, a tools list, a response_format other than text).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool", "developer")
RAW_PREFIX = "\x00raw:"     # a string value written into the body as a bare JSON token (1e999, NaN)


@dataclass(frozen=True)
class FuzzTarget:
    """What the probes need to know about the server."""
    host: str                  # "127.0.0.1:PORT", the Host header of an honest request
    model: str                 # the served model id
    vocab_size: int
    max_body_bytes: int


@dataclass
class Probe:
    mutation: str              # the catalogue entry: the report groups failures by it
    detail: str                # what was mutated, in words
    raw: bytes                 # the request as sent (head and body)
    must_refuse: bool          # True: only a 4xx is right
    hang_up: str | None = None     # None (read the answer), "mid-body", "after-send" or "mid-stream"
    sent_limit: int | None = None  # send only this many bytes of raw (mid-body)
    extra: dict = field(default_factory=dict)


# --- values --------------------------------------------------------------------------------
def _long_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghij klmnop\u00e9\u4e2d\U0001f600\"\\\n") for _ in range(n))


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


VALUE_KINDS = {
    "null": lambda r: None, "true": lambda r: True, "false": lambda r: False,
    "zero": lambda r: 0, "one": lambda r: 1, "small-int": lambda r: r.randint(-5, 300),
    "negative-int": lambda r: -r.randint(1, 10**6), "huge-int": lambda r: 2**64,
    "huge-negative-int": lambda r: -2**63 - 1, "float": lambda r: round(r.uniform(-3.0, 3.0), 3),
    "unit-float": lambda r: r.random(), "denormal": lambda r: 1e-45, "huge-float": lambda r: 1e308,
    "nan": lambda r: RAW_PREFIX + "NaN", "infinity": lambda r: RAW_PREFIX + "Infinity",
    "-infinity": lambda r: RAW_PREFIX + "-Infinity", "overflowing-literal": lambda r: RAW_PREFIX + "1e999",
    "empty-string": lambda r: "", "word": lambda r: f"w{r.randint(3, 120)}",
    "long-string": lambda r: _long_text(r, r.choice((2000, 30000))), "unicode": lambda r: "\u00e9\u4e2d\U0001f600\u200b",
    "empty-list": lambda r: [], "int-list": lambda r: [r.randint(-2, 200) for _ in range(r.randint(1, 6))],
    "string-list": lambda r: [f"w{r.randint(3, 120)}" for _ in range(r.randint(1, 6))],
    "nested-list": lambda r: _nested(r.randint(2, 60)), "empty-object": lambda r: {},
    "object": lambda r: {"type": r.choice(["text", "json_object", "x"]), "k": [1, {"a": None}]},
}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_ids(v, vocab: int) -> bool:
    return isinstance(v, list) and bool(v) and all(_int(t) and 0 <= t < vocab for t in v)


def _message_ok(m) -> bool:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        return False
    c = m.get("content", "")
    return isinstance(c, str) or (isinstance(c, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c))


def acceptable(name: str, v, chat: bool, target: FuzzTarget) -> bool:
    """May a request with field `name` = v (a JSON value; RAW_PREFIX strings are NaN/infinities)
    be answered 200? Absent and null are the default everywhere."""
    if isinstance(v, str) and v.startswith(RAW_PREFIX):
        v = float(v.removeprefix(RAW_PREFIX))       # NaN, Infinity, -Infinity, 1e999 (= inf)
    if v is None:
        return name not in ("messages", "prompt")
    checks = {
        "model": lambda: v == target.model,
        "prompt": lambda: isinstance(v, str) or _token_ids(v, target.vocab_size) or (
            isinstance(v, list) and len(v) == 1 and (isinstance(v[0], str) or _token_ids(v[0], target.vocab_size))),
        "messages": lambda: isinstance(v, list) and bool(v) and all(_message_ok(m) for m in v),
        "max_tokens": lambda: _int(v) and v >= 1, "max_completion_tokens": lambda: _int(v) and v >= 1,
        "temperature": lambda: _num(v) and 0 <= v <= 2, "top_p": lambda: _num(v) and 0 <= v <= 1,
        "seed": lambda: _int(v), "n": lambda: v == 1 and _int(v), "best_of": lambda: v == 1 and not isinstance(v, bool),
        "stop": lambda: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v)),
        "stream": lambda: isinstance(v, bool), "stream_options": lambda: isinstance(v, dict),
        "logprobs": lambda: isinstance(v, bool) if chat else (_int(v) and 0 <= v <= 20),
        "top_logprobs": lambda: _int(v) and 0 <= v <= 20, "echo": lambda: isinstance(v, bool),
        "presence_penalty": lambda: _num(v) and -2 <= v <= 2, "frequency_penalty": lambda: _num(v) and -2 <= v <= 2,
        "logit_bias": lambda: isinstance(v, dict) and all(
            k.isdigit() and int(k) < target.vocab_size and _num(b) and -100 <= b <= 100 for k, b in v.items()),
        "suffix": lambda: v == "", "tools": lambda: v == [],
        "response_format": lambda: v == {"type": "text"},
    }
    return checks[name]() if name in checks else True


COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                     "stream_options", "n", "best_of", "logprobs", "echo", "presence_penalty",
                     "frequency_penalty", "logit_bias", "user", "suffix")
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "stop", "stream", "stream_options", "n", "logprobs", "top_logprobs", "presence_penalty",
               "frequency_penalty", "logit_bias", "user", "response_format", "tools")
KNOWN_FIELDS = frozenset(COMPLETION_FIELDS + CHAT_FIELDS)


# --- requests ------------------------------------------------------------------------------
def valid_body(rng: random.Random, target: FuzzTarget, chat: bool) -> dict:
    """A request the server must serve: greedy, a few tokens (probes must stay cheap)."""
    words = " ".join(f"w{rng.randint(3, min(120, target.vocab_size - 1))}" for _ in range(rng.randint(1, 6)))
    body = {"model": target.model, "max_tokens": rng.randint(1, 8), "temperature": 0, "stream": rng.random() < 0.5}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    return body


def encode_body(body) -> bytes:
    text = json.dumps(body)
    # RAW_PREFIX values become bare tokens: "\u0000raw:NaN" -> NaN
    for token in ("NaN", "-Infinity", "Infinity", "1e999"):
        text = text.replace(json.dumps(RAW_PREFIX + token), token)
    return text.encode()


def http_request(target: FuzzTarget, path: str, body: bytes | None, headers: dict | None = None,
                 method: str = "POST", chunked: bool = False, length: str | None = None) -> bytes:
    """A raw HTTP/1.1 request; the connection closes after the answer. headers override the
    defaults (a value of None drops the header)."""
    head = {"Host": target.host, "Content-Type": "application/json", "Accept": "*/*", "Connection": "close"}
    if body is not None and not chunked:
        head["Content-Length"] = length if length is not None else str(len(body))
    if chunked:
        head["Transfer-Encoding"] = "chunked"
    head.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is None:
        return raw
    if chunked:
        pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
        return raw + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return raw + body


def _endpoint(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def field_mutation(rng, target, chat):
    """One field (or two) set to a random JSON value; unknown fields too."""
    body = valid_body(rng, target, chat)
    names = []
    for _ in range(rng.choice((1, 1, 1, 2))):
        name = rng.choice(CHAT_FIELDS if chat else COMPLETION_FIELDS) if rng.random() < 0.9 else f"x_fuzz_{rng.randint(0, 99)}"
        kind = rng.choice(sorted(VALUE_KINDS))
        body[name] = VALUE_KINDS[kind](rng)
        names.append(f"{name}={kind}")
    ok = all(acceptable(k, body[k], chat, target) for k in body)
    mutation = "field:" + "+".join(re.sub(r"^x_fuzz_\d+", "unknown", n) for n in names)
    return Probe(mutation, " ".join(names), http_request(target, _endpoint(chat), encode_body(body)), not ok)


def message_mutation(rng, target, chat):
    body = valid_body(rng, target, True)
    role = rng.choice(ROLES + ("robot", "", "USER"))
    kind = rng.choice(sorted(VALUE_KINDS))
    content = rng.choice([VALUE_KINDS[kind](rng), [{"type": "text", "text": "w9"}],
                          [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]])
    body["messages"] = [{"role": role, "content": content}] if rng.random() < 0.8 else [{"content": "w9"}]
    ok = acceptable("messages", body["messages"], True, target)
    return Probe("messages:content", f"role={role!r} content={kind}",
                 http_request(target, _endpoint(True), encode_body(body)), not ok)


def structural(name: str, must_refuse: bool):
    """A mutation of the body, headers or connection around a valid request."""
    def register(make):
        STRUCTURAL[name] = (make, must_refuse)
        return make
    return register


STRUCTURAL: dict = {}


@structural("body:not-an-object", True)
def _(rng, t, chat):
    value = rng.choice(['[{"prompt": "w5"}]', '"w5"', "42", "null", "true", "[]"])
    return value, http_request(t, _endpoint(chat), value.encode())


@structural("body:truncated", True)
def _(rng, t, chat):
    raw = encode_body(valid_body(rng, t, chat))
    cut = rng.randint(1, len(raw) - 1)
    return f"cut at {cut} of {len(raw)}", http_request(t, _endpoint(chat), raw[:cut])


@structural("body:empty", True)
def _(rng, t, chat):
    return "no body", http_request(t, _endpoint(chat), b"")


@structural("body:non-utf8", True)
def _(rng, t, chat):
    raw = encode_body(valid_body(rng, t, chat)).replace(b'"w', b'"\xff\xfe\xc3w', 1)
    return "bytes ff fe c3 in a string", http_request(t, _endpoint(chat), raw)


@structural("body:utf16", False)
def _(rng, t, chat):
    return "UTF-16 with BOM", http_request(t, _endpoint(chat), json.dumps(valid_body(rng, t, chat)).encode("utf-16"))


@structural("body:deep-nesting", True)
def _(rng, t, chat):
    depth = rng.choice((2000, 50000))
    raw = b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    return f"{depth} nested lists", http_request(t, _endpoint(chat), raw)


@structural("body:duplicate-keys", False)
def _(rng, t, chat):
    raw = encode_body(valid_body(rng, t, chat))
    return "max_tokens twice", http_request(t, _endpoint(chat), raw[:-1] + b', "max_tokens": 2}')


@structural("body:over-limit", True)
def _(rng, t, chat):
    size = t.max_body_bytes + rng.choice((1, 4096))
    body = encode_body(valid_body(rng, t, chat))
    body = body[:-1] + b', "pad": "' + b"x" * (size - len(body) - 10) + b'"}'
    # only the head and 1 KiB are sent: the Content-Length alone must get the 413 (README), and a
    # server that answers before reading a body resets the connection on the bytes left unread
    raw = http_request(t, _endpoint(chat), body)
    return f"Content-Length {len(body)}, the first 1 KiB sent", raw[:raw.index(b"\r\n\r\n") + 4 + 1024]


@structural("body:over-limit-chunked", True)
def _(rng, t, chat):
    body = b'{"prompt": "' + b"x" * (t.max_body_bytes + 100) + b'"}'
    # without the last chunk: the server must refuse once the limit is passed, not wait for the
    # end; and it has read every byte sent, so its close cannot reset the connection
    raw = http_request(t, _endpoint(chat), body, chunked=True)
    return f"{len(body)} bytes chunked, no last chunk", raw[:-len(b"0\r\n\r\n")]


@structural("body:chunked", False)
def _(rng, t, chat):
    return "valid body, chunked", http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)), chunked=True)


@structural("body:length-mismatch", True)
def _(rng, t, chat):
    body = encode_body(valid_body(rng, t, chat))
    return "Content-Length one short", http_request(t, _endpoint(chat), body, length=str(len(body) - 1))


@structural("header:content-length", True)
def _(rng, t, chat):
    value = rng.choice(["-1", "abc", "1e3", str(2**70), "5, 5"])
    return f"Content-Length: {value}", http_request(t, _endpoint(chat), b'{"prompt": "w5"}', length=value)


@structural("header:content-type", True)
def _(rng, t, chat):
    value = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                        "application/xml", "image/png", "jsonx"])
    return f"Content-Type: {value}", http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)),
                                                  {"Content-Type": value})


@structural("header:content-type-fine", False)
def _(rng, t, chat):
    value = rng.choice([None, "application/json; charset=utf-8", "Application/JSON"])
    return f"Content-Type: {value}", http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)),
                                                  {"Content-Type": value})


@structural("header:host", True)
def _(rng, t, chat):
    port = t.host.rsplit(":", 1)[1]
    value = rng.choice(["evil.example.com", f"attacker.test:{port}", f"127.0.0.1.nip.io:{port}", "x" * 300])
    return f"Host: {value[:40]}", http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)),
                                               {"Host": value})


@structural("header:origin", True)
def _(rng, t, chat):
    value = rng.choice(["http://evil.example.com", "https://attacker.test", "http://127.0.0.1.nip.io"])
    return f"Origin: {value}", http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)),
                                            {"Origin": value})


@structural("header:huge", False)
def _(rng, t, chat):
    return "a 100 KiB header", http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)),
                                            {"X-Fuzz": "y" * 100_000})


@structural("http:method", True)
def _(rng, t, chat):
    method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    return method, http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)), method=method)


@structural("http:path", True)
def _(rng, t, chat):
    path = rng.choice(["/v1/completion", "/v2/completions", "/v1/chat/completions/x", "/v1/embeddings", "/%ff"])
    return path, http_request(t, path, encode_body(valid_body(rng, t, chat)))


@structural("disconnect:mid-body", False)
def _(rng, t, chat):
    raw = http_request(t, _endpoint(chat), encode_body(valid_body(rng, t, chat)))
    return "hang up half way through the body", raw


@structural("disconnect:after-send", False)
def _(rng, t, chat):
    body = valid_body(rng, t, chat)
    body.update(stream=False, max_tokens=rng.randint(8, 64))
    return "hang up right after sending", http_request(t, _endpoint(chat), encode_body(body))


@structural("disconnect:mid-stream", False)
def _(rng, t, chat):
    body = valid_body(rng, t, chat)
    body.update(stream=True, max_tokens=rng.randint(8, 64))
    return "hang up after the first event", http_request(t, _endpoint(chat), encode_body(body))


def draw(seed: int, index: int, target: FuzzTarget) -> Probe:
    """Probe number `index` of a run: its own RNG, so that one probe can be replayed alone."""
    rng = random.Random(f"{seed}:{index}")
    chat = rng.random() < 0.5
    roll = rng.random()
    if roll < 0.55:
        return field_mutation(rng, target, chat)
    if roll < 0.62:
        return message_mutation(rng, target, chat)
    name = rng.choice(sorted(STRUCTURAL))
    make, must_refuse = STRUCTURAL[name]
    detail, raw = make(rng, target, chat)
    probe = Probe(name, f"{_endpoint(chat)}: {detail}", raw, must_refuse)
    if name.startswith("disconnect:"):
        probe.hang_up = name.split(":")[1]
        if probe.hang_up == "mid-body":
            probe.sent_limit = len(raw) - rng.randint(1, 8)
    return probe
