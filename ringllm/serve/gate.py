"""The ASGI layer in front of the app, one refusal at most per request, checked in this order:
a Host that is not this server's (DNS rebinding: a web page that renames itself 127.0.0.1) 421, a
browser Origin not allowed 403, the API key on every path but /health 401, a POST that is not
application/json 415 (a page may POST text/plain cross-site without a CORS preflight), a
Content-Length over the body limit 413 before the body is read. Then one access-log line."""
from __future__ import annotations

import hmac
import ipaddress
import logging
import time

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from ringllm.serve.requests import ApiError

access_log = logging.getLogger("ringllm.serve.access")

OPEN_PATHS = ("/health",)
ANY = "*"


def is_loopback(host: str) -> bool:
    """A loopback name or address: localhost, 127.0.0.0/8, ::1 (brackets allowed)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, listed: tuple[str, ...]) -> tuple[str, ...] | None:
    """The Host names served besides loopback ones: --allowed-hosts as given; without it, none on
    a loopback bind and any (None) on another, where clients use whatever name reaches the box."""
    if listed:
        return None if ANY in listed else listed
    return () if is_loopback(bind_host) else None


def host_name(header: str) -> str:
    """The Host header without its port: 'example:80' -> 'example', '[::1]:80' -> '[::1]'."""
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Gate:
    """allowed_hosts: Host names accepted besides loopback ones, None for any. allowed_origins:
    browser Origins accepted ("*" any); a request without Origin is not from a browser page."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, allowed_hosts: tuple[str, ...] | None = (),
                 allowed_origins: tuple[str, ...] = ()):
        if allowed_origins:     # their pages may read the answers: CORS headers, preflights answered
            app = CORSMiddleware(app, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.allowed_origins = allowed_origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, sent = time.perf_counter(), [0], [0]

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status,
                                   headers={"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
                                   )(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %s %d bytes %.3f s', client[0], client[1], scope["method"],
                            scope["path"], status[0] or "-", sent[0], time.perf_counter() - t0)

    def refusal(self, scope) -> ApiError | None:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        if self.allowed_hosts is not None:
            name = host_name(headers.get("host", "")).lower()
            if not (is_loopback(name) or name in self.allowed_hosts):
                return ApiError(421, f"Host {headers.get('host', '(none)')!r} is not this server's "
                                     "(loopback names only; --allowed-hosts adds others)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin not in self.allowed_origins and ANY not in self.allowed_origins:
            return ApiError(403, f"requests from web pages are refused: Origin {origin!r} is not in "
                                 "--allowed-origins", code="origin_not_allowed")
        # a CORS preflight (OPTIONS) carries no credentials, and answers with no data
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given:
                return ApiError(401, "missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
            if not hmac.compare_digest(given.encode("latin-1"), self.api_key.encode()):
                return ApiError(401, "incorrect API key", code="invalid_api_key")
        if scope["method"] == "POST":
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return ApiError(415, f"Content-Type must be application/json, got {media_type or '(none)'!r}",
                                code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return ApiError(413, f"request body over the limit of {self.max_body_bytes} bytes",
                            code="body_too_large")
        return None
