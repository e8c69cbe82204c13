"""Stream a multipart upload to disk with a size limit (never the whole body in memory)."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Request
from litestar.exceptions import HTTPException
from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import ApiError
from store.frames import LINE_CONTROL

logger = logging.getLogger(__name__)

MAX_TEXT_FIELD = 64 * 1024
MAX_FIELDS = 32  # form fields besides the file
FRAMING = 64 * 1024  # what multipart adds around the file (boundaries, part headers, the text fields' share)


@dataclass
class Upload:
    """The file part (saved at `path`) and the small text fields of a multipart form."""

    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    filename: str | None = None
    size: int = 0
    head: bytes = b""

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# How long a stopping server goes on reading uploads under way before it answers them 503 (inside uvicorn's 10 s wait
# for open connections: cut off at its end, one got uvicorn's plain-text 500 "Internal Server Error")
UPLOAD_STOP_GRACE_S = 7.0


def stop_uploads(app_state: object, grace_s: float = UPLOAD_STOP_GRACE_S) -> None:
    """The server is stopping: uploads still being read get `grace_s` seconds to arrive, then a 503 to send again."""
    when = asyncio.get_running_loop().time() + grace_s
    app_state.upload_stop_at = when  # (for an upload that reaches `receive_upload` after this: a request in its checks)
    for stop in list(app_state.upload_stops):
        stop.reschedule(when)


_FILENAME_STAR = re.compile(rb"""(?:^|;)\s*filename\*\s*=\s*"?([^;"]*)"?""", re.IGNORECASE)


def _extended_filename(disposition: bytes) -> str | None:
    """The RFC 5987 `filename*=UTF-8''Vorlesung%20%C3%9Cbung.vtt` of a part (what urllib3 1.x and older `requests`
    send for a name that is not ASCII), which comes first where both are given (RFC 6266); python-multipart drops it,
    and the video was titled "untitled"."""
    m = _FILENAME_STAR.search(disposition)
    if m is None:
        return None
    charset, _, rest = m.group(1).decode("latin-1").partition("'")
    _, _, encoded = rest.partition("'")
    if not encoded.isascii():  # (not percent-encoded as RFC 5987 has it: the plain name, if any, is the one)
        return None
    try:
        return urllib.parse.unquote(encoded, encoding=charset.strip() or "utf-8", errors="strict") or None
    except (LookupError, ValueError):  # a charset Python does not know or cannot use, bytes it does not hold
        return None


async def receive_upload(request: Request, dest_dir: Path, *, max_bytes: int, file_field: str = "file") -> Upload:
    """Parse multipart/form-data from the request stream; the file part goes to `dest_dir`.

    Raises ApiError 400 (malformed form, no file), 413 (over `max_bytes`). On error nothing is left on disk.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "expected application/json or multipart/form-data with a boundary")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + FRAMING:
        raise ApiError(413, f"upload larger than {max_bytes // (1024 * 1024)} MB")
    dest_dir.mkdir(parents=True, exist_ok=True)
    up = Upload()
    state: dict = {"headers": {}, "hname": b"", "hval": b"", "name": None, "fh": None, "buf": bytearray(),
                   "ended": False}
    problems: list[ApiError] = []

    def on_part_begin() -> None:
        state.update(headers={}, name=None, fh=None, buf=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hval"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].decode("latin-1").lower()] = state["hval"]
        state["hname"], state["hval"] = b"", b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(state["headers"].get("content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == file_field:
            if up.path is not None:
                problems.append(ApiError(400, "only one file per upload", field=file_field))
                return
            raw = os.path.basename(_extended_filename(state["headers"].get("content-disposition", b""))
                                   or disp.get(b"filename", b"").decode("utf-8", "replace"))
            # kept for display and the format hint: no control characters (a NUL is refused where it is checked)
            up.filename = LINE_CONTROL.sub("", raw)[:255] or None
            up.path = dest_dir / f"{uuid.uuid4().hex}.upload"
            state["fh"] = open(up.path, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["fh"] is not None:
            up.size += len(chunk)
            if len(up.head) < 4096:
                up.head += chunk[: 4096 - len(up.head)]
            if up.size > max_bytes:
                if not problems:
                    problems.append(ApiError(413, f"upload larger than {max_bytes // (1024 * 1024)} MB"))
                return
            state["fh"].write(chunk)
        else:
            state["buf"] += chunk
            if len(state["buf"]) > MAX_TEXT_FIELD and not problems:
                problems.append(ApiError(400, f"form field {state['name']!r} is too long", field=state["name"]))

    def on_part_end() -> None:
        if state["fh"] is not None:
            state["fh"].close()
            state["fh"] = None
        elif state["name"]:
            if len(up.fields) >= MAX_FIELDS and state["name"] not in up.fields:
                if not problems:
                    problems.append(ApiError(400, f"too many form fields (at most {MAX_FIELDS})"))
                return
            try:
                up.fields[state["name"]] = bytes(state["buf"]).decode("utf-8")
            except UnicodeDecodeError:
                problems.append(ApiError(400, f"form field {state['name']!r} is not UTF-8", field=state["name"]))

    def on_end() -> None:  # the closing boundary: python-multipart's finalize() does not check for it
        state["ended"] = True

    parser = MultipartParser(params[b"boundary"], callbacks={
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_end": on_end,
    })
    stops = request.app.state.upload_stops  # (the app's: see `stop_uploads`)
    try:
        async with asyncio.timeout_at(request.app.state.upload_stop_at) as stop:
            stops.add(stop)  # a stopping server sets its deadline (see `stop_uploads`)
            async for chunk in request.stream():
                parser.write(chunk)
                if problems:
                    break
            else:
                parser.finalize()
                if not problems and not state["ended"]:  # a body cut off mid-file would be stored half
                    raise ApiError(400, "malformed multipart body: it ends before its closing boundary")
    except TimeoutError as exc:  # (only a stop sets the deadline)
        up.discard()
        raise ApiError(503, "the server is stopping; send the upload again", code="unavailable",
                       retry_after=5) from exc
    except ApiError:
        up.discard()
        raise
    except HTTPException as exc:  # the server's own body limit (the file plus FRAMING)
        up.discard()
        if exc.status_code == 413:
            raise ApiError(413, f"upload larger than {max_bytes // (1024 * 1024)} MB") from exc
        raise
    except Exception as exc:  # python-multipart raises its own errors on malformed bodies
        up.discard()
        raise ApiError(400, f"malformed multipart body: {exc}") from exc
    except BaseException:  # cancelled (a shutdown cuts the request short): no half-written file left behind
        up.discard()
        raise
    finally:
        stops.discard(stop)
        if state["fh"] is not None:
            state["fh"].close()
    if problems:
        up.discard()
        raise problems[0]
    if up.path is None:
        raise ApiError(400, f"no file in the form (expected a field named {file_field!r})", field=file_field)
    if up.size == 0:
        up.discard()
        raise ApiError(400, "the uploaded file is empty", field=file_field)
    try:  # acknowledged means stored: the bytes and the file's name reach the disk before the job is committed
        await asyncio.to_thread(make_durable, up.path)
    except BaseException as exc:
        up.discard()
        if isinstance(exc, OSError):
            logger.error("could not store an upload: %s", exc)
            raise ApiError(503, "the upload could not be stored; please try again", retry_after=5) from exc
        raise
    return up


def make_durable(path: Path) -> None:
    """fsync the file, then the directories naming it: its course's (made for it perhaps), `uploads/` (made by the
    data folder's first upload) and the data folder, which names `uploads/`."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    for d in (path.parent, path.parent.parent, path.parent.parent.parent):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
