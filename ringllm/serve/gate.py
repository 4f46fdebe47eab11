"""The ASGI layer in front of the app: one access-log line per request, the API key on every path
but /health, and a Content-Length over the body limit refused before the body is read."""
from __future__ import annotations

import hmac
import logging
import time

from starlette.responses import JSONResponse

from ringllm.serve.requests import ApiError

access_log = logging.getLogger("ringllm.serve.access")

OPEN_PATHS = ("/health",)


class Gate:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

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
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given:
                return ApiError(401, "missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return ApiError(401, "incorrect API key", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return ApiError(413, f"request body over the limit of {self.max_body_bytes} bytes",
                            code="body_too_large")
        return None
