"""Structured logs (one JSON line per request, never a query string or token) and Prometheus metrics."""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from prometheus_client import Counter, Histogram
from litestar.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("studyhall.access")

REQUESTS = Counter("studyhall_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("studyhall_http_request_seconds", "HTTP request duration", ["method", "route"])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would print query strings (tokens); ours replaces it.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(_client_fault)


def _client_fault(record: logging.LogRecord) -> bool:
    """uvicorn logs a client's text frame that is not UTF-8 (closed with 1007) as an ERROR with a traceback: any
    client could fill the error log with them. One INFO line without the traceback."""
    if record.msg == "Invalid UTF-8 sequence received from client.":
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.INFO, "INFO", None, None
        return logging.getLogger("uvicorn.error").isEnabledFor(logging.INFO)
    return True


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def request_id_of(scope: Scope) -> str:
    """The request's id: the client's (or a proxy's) `X-Request-ID` when it is a plain token, else a new one;
    kept in the scope, sent back as `X-Request-ID`, and in the request's log lines and a 500's message."""
    if (rid := scope.get("studyhall_request_id")) is None:  # type: ignore[union-attr]
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope["studyhall_request_id"] = rid  # type: ignore[typeddict-unknown-key]
    return rid


CLIENT_CLOSED = 499  # as nginx logs it: the client closed the connection before the answer


def access_log_middleware(app: ASGIApp) -> ASGIApp:
    """Pure ASGI middleware: time each HTTP request, log one line, count it."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        rid = request_id_of(scope)
        hung_up = started = False  # the client went away before an answer started: 499, not a 500 nobody caused

        async def send_wrapper(message) -> None:  # type: ignore[no-untyped-def]
            nonlocal status, started
            if message["type"] == "http.response.start":  # (the framework answers a body cut off with a 500)
                status, started = (CLIENT_CLOSED if hung_up else message["status"]), True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        async def receive_wrapper():  # type: ignore[no-untyped-def]
            nonlocal hung_up
            message = await receive()
            if message["type"] == "http.disconnect":
                hung_up = True
            return message

        try:
            await app(scope, receive_wrapper, send_wrapper)
        finally:
            if hung_up and not started:
                status = CLIENT_CLOSED
            elapsed = time.perf_counter() - start
            route = scope.get("path_template") or "unmatched"
            method = scope.get("method", "")
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(elapsed)
            user = scope.get("user")
            logger.info("request", extra={"fields": {
                "method": method, "path": scope.get("path"), "status": status,
                "duration_ms": round(elapsed * 1000, 2), "user_id": getattr(user, "id", None), "request_id": rid}})

    return middleware
