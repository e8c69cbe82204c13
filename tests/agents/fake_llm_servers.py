"""A local HTTP server that speaks OpenAI's chat-completions and Anthropic's messages wire formats,
so the real SDKs can be exercised offline.

    with FakeLLMServer() as srv:
        srv.script(Reply("Binary search halves the interval.", chunks=4))
        llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=srv.openai_base_url, max_retries=0)
        ...
        srv.requests[-1].body["messages"]

Replies are taken from the script in order; when it is empty, `default` answers. Every request is
recorded (path, headers, JSON body). Set `api_key` to make a wrong or missing key a real 401.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"

# What each API answers for a status, as the real services word it.
OPENAI_ERRORS = {
    400: {"message": "Unsupported value: 'temperature' does not support 0.2 with this model. Only the default "
                     "(1) value is supported.", "type": "invalid_request_error", "param": "temperature",
          "code": "unsupported_value"},
    401: {"message": "Incorrect API key provided: sk-wr***ng. You can find your API key at "
                     "https://platform.openai.com/account/api-keys.", "type": "invalid_request_error",
          "param": None, "code": "invalid_api_key"},
    429: {"message": "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3, "
                     "Requested 1. Please try again in 20s.", "type": "requests", "param": None,
          "code": "rate_limit_exceeded"},
    500: {"message": "The server had an error while processing your request. Sorry about that!",
          "type": "server_error", "param": None, "code": None},
}
ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "`temperature` is deprecated for this model."),
    401: ("authentication_error", "invalid x-api-key"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}

Midstream = Literal["drop", "error", "truncate"]


@dataclass
class Reply:
    """One scripted answer.

    status: an HTTP error status to answer with instead (401, 429, 500, 529, ...), before any streaming.
    midstream: for streaming requests, after `fail_after` deltas:
      "drop"     - close the socket mid-body (no final chunk), like a lost connection;
      "error"    - an in-band error: Anthropic `event: error` (overloaded_error), OpenAI `data: {"error":…}`;
      "truncate" - end the body cleanly without the closing events (no finish_reason / message_stop).
    """

    text: str = "Hello from the fake model."
    chunks: int = 3
    input_tokens: int = 12
    output_tokens: int = 7
    status: int | None = None
    error_message: str | None = None  # overrides the wording of a `status` error
    midstream: Midstream | None = None
    fail_after: int = 1
    model: str | None = None  # reported model; default: the requested one
    delay_s: float = 0.0  # pause before each delta
    wait_s: float = 0.0  # pause before answering at all (streaming or not): a slow model
    raw: tuple[str, str] | None = None  # (content type, body): a 200 with this body instead, like a proxy's page
    finish: str | None = None  # OpenAI finish_reason / Anthropic stop_reason instead of stop / end_turn
    refusal: str | None = None  # OpenAI: the model's refusal (message.refusal, or a delta's), with no content
    error_code: str | None = None  # with `status`: the OpenAI error's `code` (e.g. insufficient_quota)
    headers: dict[str, str] = field(default_factory=dict)  # with `status`: extra response headers

    def deltas(self) -> list[str]:
        """`text` split into `chunks` non-empty pieces (fewer if the text is shorter)."""
        n = max(1, min(self.chunks, len(self.text)))
        size, extra = divmod(len(self.text), n)
        out, i = [], 0
        for k in range(n):
            j = i + size + (1 if k < extra else 0)
            out.append(self.text[i:j])
            i = j
        return [d for d in out if d] or [""]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict


@dataclass
class _State:
    api_key: str | None
    default: Reply
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[Recorded] = field(default_factory=list)
    disconnects: int = 0
    # OpenAI: parameters this "model" refuses while present in a request: name -> (status, error object), as
    # api.openai.com words it (`refuse`)
    refused: dict[str, tuple[int, dict]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, as the real APIs serve
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        st = self.server.state
        with st.lock:
            st.requests.append(Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            reply = st.replies.popleft() if st.replies else st.default
        time.sleep(reply.wait_s)
        try:
            if reply.raw is not None:
                self._raw(*reply.raw)
            elif self.path == OPENAI_PATH:
                self._openai(body, reply)
            elif self.path == ANTHROPIC_PATH:
                self._anthropic(body, reply)
            else:
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up mid-reply (a cancelled or closed stream).
            self.close_connection = True
            with st.lock:
                st.disconnects += 1

    # -- plumbing ---------------------------------------------------------------------------------
    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _raw(self, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_body(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _key_ok(self, presented: str | None) -> bool:
        want = self.server.state.api_key
        return want is None or presented == want

    # -- OpenAI -----------------------------------------------------------------------------------
    def _openai(self, body: dict, reply: Reply) -> None:
        auth = self.headers.get("authorization") or ""
        for name, (refused_status, refusal_err) in self.server.state.refused.items():
            if body.get(name) not in (None, False):  # the scripted reply is not used up by a refused request
                with self.server.state.lock:
                    self.server.state.replies.appendleft(reply)
                self._json(refused_status, {"error": refusal_err} if "message" in refusal_err else refusal_err)
                return
        status = reply.status or (None if self._key_ok(auth.removeprefix("Bearer ")) else 401)
        if status:
            err = dict(OPENAI_ERRORS.get(status, {"message": f"HTTP {status}", "type": "server_error",
                                                  "param": None, "code": None}))
            if reply.error_message:
                err.update(message=reply.error_message, param=None)
            if reply.error_code:
                err.update(code=reply.error_code, type=reply.error_code)
            self._json(status, {"error": err},
                       {**({"retry-after": "1"} if status == 429 else {}), **reply.headers})
            return
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model = reply.model or body.get("model", "")
        usage = {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
                 "total_tokens": reply.input_tokens + reply.output_tokens}
        if not body.get("stream"):
            self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": None if reply.refusal else reply.text,
                                                     "refusal": reply.refusal},
                             "logprobs": None, "finish_reason": reply.finish or "stop"}],
                "usage": usage, "system_fingerprint": "fp_fake"})
            return

        def chunk(choices: list, **extra: object) -> None:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "fp_fake", "choices": choices, **extra}
            self._chunk(f"data: {json.dumps(obj)}\n\n")

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        nulls = {"usage": None} if include_usage else {}
        self._start_sse()
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None,
                "finish_reason": None}], **nulls)
        for i, piece in enumerate([] if reply.refusal else reply.deltas()):
            if reply.midstream and i == reply.fail_after:
                self._openai_fail(reply.midstream)
                return
            time.sleep(reply.delay_s)
            chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}], **nulls)
        if reply.refusal:
            chunk([{"index": 0, "delta": {"refusal": reply.refusal}, "logprobs": None, "finish_reason": None}],
                  **nulls)
        if reply.midstream:
            self._openai_fail(reply.midstream)
            return
        chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reply.finish or "stop"}], **nulls)
        if include_usage:
            chunk([], usage=usage)
        self._chunk("data: [DONE]\n\n")
        self._end_body()

    def _openai_fail(self, mode: Midstream) -> None:
        if mode == "drop":
            self._drop()
            return
        if mode == "error":
            self._chunk("data: " + json.dumps({"error": OPENAI_ERRORS[500]}) + "\n\n")
        self._end_body()

    # -- Anthropic --------------------------------------------------------------------------------
    def _anthropic(self, body: dict, reply: Reply) -> None:
        # anthropic SDK 2.x sends the key as `Authorization: Bearer`; older SDKs as `x-api-key`.
        key = self.headers.get("x-api-key") or (self.headers.get("authorization") or "").removeprefix("Bearer ")
        status = reply.status or (None if self._key_ok(key) else 401)
        req_id = f"req_{uuid.uuid4().hex[:24]}"
        if status:
            kind, msg = ANTHROPIC_ERRORS.get(status, ("api_error", f"HTTP {status}"))
            msg = reply.error_message or msg
            self._json(status, {"type": "error", "error": {"type": kind, "message": msg}, "request_id": req_id},
                       {"request-id": req_id, **({"retry-after": "1"} if status == 429 else {})})
            return
        mid, model = f"msg_{uuid.uuid4().hex[:24]}", reply.model or body.get("model", "")
        if not body.get("stream"):
            self._json(200, {
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": reply.text}], "stop_reason": reply.finish or "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": reply.input_tokens,
                                                 "output_tokens": reply.output_tokens,
                                                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}},
                {"request-id": req_id})
            return

        def event(name: str, data: dict) -> None:
            self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n")

        self._start_sse()
        event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})
        event("content_block_start", {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}})
        event("ping", {"type": "ping"})
        for i, piece in enumerate(reply.deltas()):
            if reply.midstream and i == reply.fail_after:
                self._anthropic_fail(reply.midstream, event)
                return
            time.sleep(reply.delay_s)
            event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": piece}})
        if reply.midstream:
            self._anthropic_fail(reply.midstream, event)
            return
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        event("message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": reply.finish or "end_turn", "stop_sequence": None},
                                "usage": {"output_tokens": reply.output_tokens}})
        event("message_stop", {"type": "message_stop"})
        self._end_body()

    def _anthropic_fail(self, mode: Midstream, event) -> None:  # type: ignore[no-untyped-def]
        if mode == "drop":
            self._drop()
            return
        if mode == "error":
            event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        self._end_body()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class FakeLLMServer:
    """OpenAI + Anthropic wire formats on 127.0.0.1 (a free port), in a background thread."""

    def __init__(self, api_key: str | None = None, default: Reply | None = None) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = _State(api_key=api_key, default=default or Reply())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"  # the OpenAI SDK appends /chat/completions

    @property
    def anthropic_base_url(self) -> str:
        return self.url  # the Anthropic SDK appends /v1/messages

    @property
    def requests(self) -> list[Recorded]:
        with self._httpd.state.lock:
            return list(self._httpd.state.requests)

    @property
    def disconnects(self) -> int:
        """How many replies were cut short because the client closed the connection."""
        with self._httpd.state.lock:
            return self._httpd.state.disconnects

    def wait_disconnects(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least `n` client disconnects were seen (the server notices on its next write)."""
        deadline = time.monotonic() + timeout
        while self.disconnects < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    @property
    def api_key(self) -> str | None:
        return self._httpd.state.api_key

    @api_key.setter
    def api_key(self, value: str | None) -> None:
        self._httpd.state.api_key = value

    def refuse(self, name: str, status: int = 400, error: dict | None = None) -> None:
        """OpenAI: answer `status` to any request sending parameter `name` (as a model or a compatible server
        that does not take it), with api.openai.com's unsupported-parameter error unless `error` is given (an
        object with `message` is wrapped in `{"error": …}`; anything else is sent as it is)."""
        with self._httpd.state.lock:
            self._httpd.state.refused[name] = (status, error or {
                "message": f"Unsupported parameter: '{name}' is not supported with this model.",
                "type": "invalid_request_error", "param": name, "code": "unsupported_parameter"})

    def script(self, *replies: Reply) -> None:
        """Queue replies, answered in order before falling back to the default."""
        with self._httpd.state.lock:
            self._httpd.state.replies.extend(replies)

    def reset(self, default: Reply | None = None) -> None:
        """Forget the script and the recorded requests."""
        st = self._httpd.state
        with st.lock:
            st.replies.clear()
            st.requests.clear()
            st.disconnects = 0
            st.refused.clear()
            st.default = default or Reply()

    def start(self) -> FakeLLMServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
