"""One JSON error shape for every failure: {status, code, message, field?}."""
from __future__ import annotations

import logging
import math
import re
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from server.observability import request_id_of
from store import db

logger = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "invalid_state", 413: "too_large", 415: "unsupported_media_type", 422: "unprocessable", 429: "rate_limited"}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code and, for bad input, the offending field."""

    def __init__(self, status_code: int, message: str, *, code: str | None = None, field: str | None = None,
                 retry_after: float | None = None, extra: dict | None = None):
        # retry_after (seconds): sent as a `Retry-After` header (whole seconds, rounded up) and in the body
        headers = None if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code or _CODES.get(status_code, "error")
        self.field = field
        self.retry_after = retry_after
        self.extra = extra  # more of the body (e.g. the `user_id` a name conflict is with)


def body(status: int, code: str, message: str, field: str | None = None,
         retry_after: float | None = None, extra: dict | None = None) -> dict:
    out = {"status": status, "code": code, "message": message, **(extra or {})}
    if field is not None:
        out["field"] = field
    if retry_after is not None:
        out["retry_after"] = round(retry_after, 3)
    return out


_PATH = re.compile(r"at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])+)`")


def field_of(exc: msgspec.ValidationError) -> str | None:
    """'Expected `str`, got `int` - at `$.title`' -> 'title'; unknown fields are named too."""
    text = str(exc)
    m = _PATH.search(text)
    if m:
        return m.group(1).lstrip(".")
    m = re.search(r"(?:unknown|missing required) field `([^`]+)`", text)
    if m:
        return m.group(1)
    m = re.match(r"`([a-z_][a-z0-9_]*)` ", text)  # a check after decoding names its field first: "`opens_at` must…"
    return m.group(1) if m else None


# Litestar's words for a query parameter that is required and missing (it names no field of its own)
_MISSING_PARAM = re.compile(r"^Missing required (?:query|header|cookie) parameter '([^']+)'")


def _param_choices(request: Request, key: object) -> str:
    """For a query parameter refused as "Invalid enum value": the values its handler takes (a Literal)."""
    try:
        params = request.route_handler.parsed_fn_signature.parameters
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    for name, fd in params.items():
        if key not in (name, getattr(fd.kwarg_definition, "query", None)):
            continue
        ann = fd.annotation
        while get_origin(ann) in (Union, UnionType, Annotated):  # `X | None`, Annotated[X, …]
            ann = next(a for a in get_args(ann) if a is not type(None))
        if get_origin(ann) is Literal:
            return f" (one of: {', '.join(map(str, get_args(ann)))})"
    return ""


def http_exception_handler(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    # a 401 names the scheme to authenticate with (RFC 9110)
    challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(exc, ApiError):
        return Response(body(status, exc.code, exc.detail, exc.field, exc.retry_after, exc.extra), status_code=status,
                        headers={**(exc.headers or {}), **challenge})
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            detail = first.get("message") or exc.detail
            if str(detail).startswith("Invalid enum value"):
                detail = f"{detail}{_param_choices(request, first.get('key'))}"
            return Response(body(status, "bad_request", f"{detail}", first.get("key")), status_code=status)
    if status == 404 and exc.detail == "Not Found":  # no route: as for an id not written in ASCII digits
        return Response(body(404, "not_found", f"no such path: {request.scope['path'][:200]!r}"), status_code=404)
    missing = _MISSING_PARAM.match(str(exc.detail or "")) if status == 400 else None
    return Response(body(status, _CODES.get(status, "error"), exc.detail, missing.group(1) if missing else None),
                    status_code=status, headers={**(getattr(exc, "headers", None) or {}), **challenge})


# What the handlers below answer (a streamed ask ends with the same: server.api.tutor.stream_error).
BAD_VALUE = "a value in the request is out of range or cannot be stored"
GONE = "something this request refers to no longer exists"
CONFLICT = "a concurrent change got in the way; nothing was stored, try again"


def data_error_handler(request: Request, exc: Exception) -> Response:
    """A value Postgres cannot take (an id beyond 64 bits, a NUL character, a date out of its range): the
    request's fault, so 400, without the database's wording."""
    logger.info("bad value on %s %s: %s", request.method, request.url.path, exc)
    return Response(body(400, "bad_request", BAD_VALUE),
                    status_code=400)


def gone_parent_handler(request: Request, exc: Exception) -> Response:
    """A row that refers to something deleted while the request ran (a course, pod or user): 404, not 500."""
    # a warning: besides the races it answers (a course deleted mid-request), it would also hide a wrongly wired id
    logger.warning("referenced row gone on %s %s (%s): %s", request.method, request.url.path,
                   getattr(exc, "constraint_name", None), exc)
    return Response(body(404, "not_found", GONE), status_code=404)


# The service's own words (an OpenAI error can quote the API key) stay in the log.
EMBEDDER_UNAVAILABLE = "the embedding model is unavailable; try again shortly"


EMBEDDER_MISCONFIGURED = "the embedding model is misconfigured; the server's log says what to change"


def embedder_api_error(exc: Exception) -> ApiError:
    """What an asker is told when the embedder fails: 503, to wait out, or (misconfigured) for the operator."""
    from agents.embedder import EmbedderMisconfigured

    if isinstance(exc, EmbedderMisconfigured):
        return ApiError(503, EMBEDDER_MISCONFIGURED, code="embedder_misconfigured")
    return ApiError(503, EMBEDDER_UNAVAILABLE, code="embedder_unavailable", retry_after=5)


def embedder_error_handler(request: Request, exc: Exception) -> Response:
    """The embedding model cannot be used now (the OpenAI embedder's service down or refusing, a broken install):
    503 saying so (the reason is logged), not a bare 500. Ingest jobs retry on it by themselves."""
    logger.warning("embedder failed on %s %s: %s", request.method, request.url.path, exc)
    return http_exception_handler(request, embedder_api_error(exc))


# Postgres or Redis down, restarting or out of reach (store.db.UNREACHABLE): 503, not 500.
UNREACHABLE = db.UNREACHABLE
UNAVAILABLE = "the database or Redis cannot be reached right now; try again shortly"


def unavailable_handler(request: Request, exc: Exception) -> Response:
    """Postgres or Redis down, restarting or unreachable: 503 with `Retry-After`, so clients and load balancers
    try again, and one log line (not a traceback per request for as long as the outage lasts)."""
    logger.warning("service unreachable on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return http_exception_handler(request, ApiError(503, UNAVAILABLE, code="unavailable", retry_after=5))


# A transaction rolled back for a concurrent change, nothing of it stored, that works when tried again: a deadlock
# or serialization failure; or a migration that changed a table under a statement asyncpg had cached (it cannot
# re-prepare one inside a transaction; the next try prepares it afresh). Queries name their columns, so adding a
# column does not do this.
ROLLED_BACK: tuple[type[Exception], ...] = (asyncpg.TransactionRollbackError, asyncpg.InvalidCachedStatementError)


def contention_handler(request: Request, exc: Exception) -> Response:
    """Postgres rolled the request's transaction back for a concurrent change (ROLLED_BACK): nothing of it was
    stored and trying again works, so 409 with `Retry-After`, not 500. (Known lock orders are kept so deadlocks
    do not happen; a warning says where one did.)"""
    logger.warning("transaction rolled back on %s %s: %s", request.method, request.url.path, exc)
    return http_exception_handler(request, ApiError(409, CONFLICT, code="conflict", retry_after=1))


def internal_error_handler(request: Request, exc: Exception) -> Response:
    rid = request_id_of(request.scope)  # the same id as the access line and the X-Request-ID header
    logger.exception("unhandled error on %s %s", request.method, request.url.path,
                     extra={"fields": {"request_id": rid}})
    return Response(body(500, "internal", f"internal server error (request {rid})"),
                    status_code=HTTP_500_INTERNAL_SERVER_ERROR)
