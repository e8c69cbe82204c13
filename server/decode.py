"""Decode request bodies into msgspec Structs with clear 4xx errors naming the field."""
from __future__ import annotations

import re
import unicodedata
from typing import Any, TypeVar

import msgspec
import msgspec.inspect
from litestar import Request

from server.api.schemas import LINE_TEXT, LINES, NO_CONTROL, NOT_BLANK, ONE_LINE
from server.errors import ApiError, field_of
from store.frames import CLIENT_MSG_ID, CLIENT_MSG_ID_RULE, ECHO_MAX, blank, echo, has_nul, without_format

T = TypeVar("T")


def decode_json(raw: bytes, typ: type[T]) -> T:
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")
    if has_nul(raw):
        raise ApiError(400, "text must not contain NUL characters (\\u0000)")
    try:
        return msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        field = field_of(exc)
        if field is not None and len(field) > ECHO_MAX:
            field = echo(field)
        raise ApiError(400, echo(_explain(str(exc), field) + _allowed(typ, str(exc))), field=field) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        if isinstance(exc, msgspec.DecodeError) and _lone_surrogate(raw):  # msgspec: "Input data was truncated"
            raise ApiError(400, "request body is not valid JSON: a string holds half of a UTF-16 surrogate pair "
                                "(such as \\ud800 alone), which is no character") from exc
        raise ApiError(400, echo(f"request body is not valid JSON: {exc}")) from exc
    except RecursionError as exc:
        raise ApiError(400, "request body is nested too deeply") from exc


# one backslash escape of a JSON text, read left to right (backslashes occur only inside strings, each starting one)
_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{4}|[\s\S])")


def _lone_surrogate(raw: bytes) -> bool:
    """Whether the JSON text escapes half of a UTF-16 surrogate pair alone: a high one (\\ud800-\\udbff) not followed
    at once by an escaped low one, or a low one (\\udc00-\\udfff) not right after a high one."""
    pending = None  # where the escape after an unpaired high surrogate must start
    for m in _ESCAPE.finditer(raw):
        code = int(m.group(1)[1:], 16) if m.group(1)[:1] == b"u" else -1
        low = 0xDC00 <= code <= 0xDFFF
        if pending is not None and (not low or m.start() != pending):
            return True
        if low and pending is None:
            return True
        pending = m.end() if 0xD800 <= code <= 0xDBFF else None
    return pending is not None


# msgspec names the regex a string failed; say what it means instead
_PATTERNS = {repr(NOT_BLANK): "must not be blank", repr(NO_CONTROL): "must not contain control characters",
             repr(LINES): "must not contain control characters other than tabs and line breaks",
             repr(LINE_TEXT): "must not be blank, nor contain control characters or line breaks",
             repr(ONE_LINE): "must not contain control characters or line breaks"}


def idempotency_key(request: Request) -> str | None:
    """The request's `Idempotency-Key` header, trimmed (1 to 100 characters), or None without one."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip()
    if not 0 < len(key) <= 100:
        raise ApiError(400, "Idempotency-Key must be 1 to 100 characters", field="Idempotency-Key")
    return key


def callers_key(user_id: int, key: str | None) -> str | None:
    """An Idempotency-Key as stored: scoped to its caller (two instructors of a course may pick the same key; one
    got the other's video or drafts back, and the second upload was deleted)."""
    return None if key is None else f"{user_id}:{key}"


def trimmed(value: str, field: str) -> str:
    """`value` without surrounding spaces; 400 naming `field` when nothing visible is left."""
    value = value.strip()
    if blank(value):
        raise ApiError(400, f"{field} must not be blank", field=field)
    return value


def person_name(value: str, field: str = "name") -> str:
    """A user's or bot's name as others read it: composed (NFC), without invisible format characters (a zero-width
    space made a second bot "tw\u200bin" show as "twin"; a bidi override turned the name around), the zero-width
    joiners of emoji and scripts kept; trimmed, 400 when nothing visible is left."""
    return trimmed(unicodedata.normalize("NFC", without_format(value)), field)


# the other patterns of the API's bodies
_PATTERNS[repr(r"^[A-Za-z0-9_.:-]+(?![\s\S])")] = "may hold only letters, digits and _ . : -"
_PATTERNS[repr(r"^[0-9]{2}:[0-9]{2}(?![\s\S])")] = "must be a time as HH:MM"
_PATTERNS[repr(CLIENT_MSG_ID)] = CLIENT_MSG_ID_RULE


def _allowed(typ: Any, text: str) -> str:
    """For a value not among a field's few allowed ones ("Invalid enum value 'impossible'"): which they are. The
    field may be nested (`$.availability[0].day`)."""
    m = _PATH.search(text)
    if not text.startswith("Invalid enum value") or m is None:
        return ""
    try:
        t = msgspec.inspect.type_info(typ)
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    for name, _index in _STEP.findall(m.group(1)):
        t = _unwrap(t)
        if name:
            t = {f.name: f.type for f in getattr(t, "fields", ())}.get(name)
        elif isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.SetType, msgspec.inspect.VarTupleType)):
            t = t.item_type
        else:
            return ""
    t = _unwrap(t)
    if isinstance(t, msgspec.inspect.LiteralType):
        return f" (one of: {', '.join(map(str, t.values))})"
    return ""


def _unwrap(t: Any) -> Any:
    """`X | None`, `X | UnsetType` and Annotated[X, Meta(...)] as X."""
    while isinstance(t, (msgspec.inspect.UnionType, msgspec.inspect.Metadata)):
        t = t.type if isinstance(t, msgspec.inspect.Metadata) else next(
            (u for u in t.types if not isinstance(u, (msgspec.inspect.NoneType, msgspec.inspect.UnsetType))), None)
    return t


_PATH = re.compile(r"at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])+)`")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def _explain(text: str, field: str | None) -> str:
    for pattern, meaning in _PATTERNS.items():
        if f"matching regex {pattern}" in text:
            return f"invalid field: `{field or 'value'}` {meaning}"
    if "matching regex" in text:  # a pattern with no words here: say what is wrong, not the regex
        return f"invalid field: `{field or 'value'}` holds characters or a form that is not allowed"
    return f"invalid field: {text}"


async def read_body(request: Request, *, max_bytes: int | None = None) -> bytes:
    """The raw body, refused with 413 past the API's body size limit (uploads have their own)."""
    limit = max_bytes or request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes")
    raw = bytearray()  # (`bytes +=` copied the body so far for every piece: quadratic in many small pieces)
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise ApiError(413, f"request body larger than {limit} bytes")
    return bytes(raw)


async def read_json(request: Request, typ: type[T], *, max_bytes: int | None = None) -> T:
    """Read and decode the body as JSON (whatever Content-Type claims); enforces the body size limit."""
    return decode_json(await read_body(request, max_bytes=max_bytes), typ)
