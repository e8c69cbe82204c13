"""Chat models behind one small interface: `LLM.complete` and `LLM.stream`, for OpenAI (or any
OpenAI-compatible server via a base URL) and Anthropic. Callers see `LLMError` only, never SDK errors.

`get_llm(settings)` returns None when no provider is configured; callers then use their offline path.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

from store.settings import Settings

logger = logging.getLogger(__name__)

# The status codes the SDKs themselves retry; anything else is a caller problem (auth, bad request).
RETRYABLE_STATUS = frozenset({408, 409, 429})
# Error `type`s that arrive inside a 200 stream (Anthropic `event: error`, OpenAI `data: {"error":…}`).
RETRYABLE_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error",
                             "server_error", "rate_limit_exceeded", "tokens", "requests"})


class Message(TypedDict):
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    model: str  # as the server reported it (e.g. a dated snapshot), else the requested model
    provider: str
    latency_s: float  # request to last byte; for a stream this includes the consumer's time between deltas
    truncated: bool = False  # the reply stopped at `max_tokens`, not where the model meant to end it


class LLMError(Exception):
    """A provider call failed. `retryable` says whether trying again later can help."""

    def __init__(self, message: str, *, retryable: bool, provider: str = "", status: int | None = None,
                 refused: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.provider = provider
        self.status = status
        self.refused = refused  # the model refused, or the provider's content filter stopped the reply


_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")


def storable(text: str) -> str:
    """A model's text as it can be stored and sent: a surrogate pair its JSON escaped in halves ("\\ud83d\\ude00")
    joined into its character, a lone half (which no encoder takes: the chapter, the answer or the condensed
    question holding one failed whole, on every attempt) dropped."""
    if not _SURROGATE.search(text):
        return text
    text = _SURROGATE_PAIR.sub(lambda m: chr(0x10000 + ((ord(m.group(0)[0]) - 0xD800) << 10)
                                             + ord(m.group(0)[1]) - 0xDC00), text)
    return _SURROGATE.sub("", text)


@dataclass(frozen=True)
class _End:
    """The last item a provider's raw stream yields: what the server reported about the whole reply."""

    usage: Usage
    model: str
    truncated: bool = False


class LLMStream:
    """Async iterator of text deltas. Once exhausted, `completion` (and `usage`) hold the totals; after
    an `LLMError` mid-stream, `text` keeps what arrived and `usage_so_far` the tokens the provider had reported
    (billed all the same). Use `async with` (or `aclose()`) to stop early."""

    def __init__(self, provider: str, model: str, raw: AsyncIterator[str | Usage | _End],
                 to_error: Callable[[BaseException], LLMError | None]) -> None:
        self.provider = provider
        self.model = model
        self.completion: Completion | None = None
        self.first_delta_s: float | None = None  # time to first text, for latency metrics
        self._raw = raw
        self._to_error = to_error
        self._parts: list[str] = []
        self._end: _End | None = None
        self._reported = Usage()
        self._t0: float | None = None
        self._high = ""  # a delta's last character, the first half of a surrogate pair: joined to the next delta

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def usage(self) -> Usage | None:
        return self.completion.usage if self.completion else None

    @property
    def usage_so_far(self) -> Usage:
        """The totals once complete; before that (a stream that failed) what the provider had reported."""
        return self.completion.usage if self.completion else self._reported

    def __aiter__(self) -> LLMStream:
        return self

    async def __anext__(self) -> str:
        if self._t0 is None:
            self._t0 = time.monotonic()
        while True:
            try:
                item = await self._raw.__anext__()
            except StopAsyncIteration:
                self._finish()
                raise
            except Exception as exc:
                err = self._to_error(exc)
                if err is None and isinstance(exc, (AttributeError, TypeError, KeyError, IndexError)):
                    # an event not in the API's shape (a chunk without `choices`, a delta without `delta`)
                    err = LLMError(f"{self.provider}: unusable stream ({type(exc).__name__}: {exc})",
                                   retryable=False, provider=self.provider)
                if err is None:
                    raise
                logger.warning("%s stream failed after %d chars: %s", self.provider, len(self.text), err.message)
                raise err from exc
            if isinstance(item, _End):
                self._end = item
                continue
            if isinstance(item, Usage):  # counts reported mid-stream
                self._reported = item
                continue
            if self._high:
                item, self._high = self._high + item, ""
            if item and "\ud800" <= item[-1] <= "\udbff":
                item, self._high = item[:-1], item[-1]
            item = storable(item)
            if item:
                if self.first_delta_s is None:
                    self.first_delta_s = time.monotonic() - self._t0
                self._parts.append(item)
                return item

    def _finish(self) -> None:
        # Providers raise on an incomplete reply, so no _End here means the stream was closed early.
        if self.completion is not None or self._end is None:
            return
        self.completion = Completion(self.text, self._end.usage, self._end.model or self.model, self.provider,
                                     time.monotonic() - (self._t0 or time.monotonic()), self._end.truncated)

    async def aclose(self) -> None:
        await self._raw.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> LLMStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@runtime_checkable
class LLM(Protocol):
    """A chat model. `name` is the provider ('openai', 'anthropic'), `model` the model asked for."""

    name: str
    model: str

    async def complete(self, messages: list[Message], *, system: str | None = None, max_tokens: int = 512,
                       temperature: float | None = 0.2) -> Completion:
        """The whole reply at once."""
        ...

    def stream(self, messages: list[Message], *, system: str | None = None, max_tokens: int = 512,
               temperature: float | None = 0.2) -> LLMStream:
        """The reply as text deltas; nothing is sent until the first `__anext__`."""
        ...


def _check(messages: list[Message]) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    for m in messages:
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs role 'user'|'assistant' and str content; got {m!r:.80}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    # Anthropic's stream lets the HTTP client's errors through on a dropped connection.
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(__import__(name).HTTPError)
        except ImportError:
            pass
    return tuple(found)


# A credential quoted in an error (an HTTP library refusing a header quotes it whole): never passed on.
_CREDENTIAL = re.compile(r"(?i)(\bbearer\s+|\bx-api-key\b\W{0,4}|\bapi[_-]?key\b\W{0,4})[^\s'\"]+"
                         r"|\bsk-[A-Za-z0-9][A-Za-z0-9_\-]{6,}")


# The keys this process was given (registered as each client is made): masked wherever they are quoted as a token
# of their own, whatever their shape (one not shaped like "sk-" and seven more characters was logged whole when an
# error quoted it; a key that is a word, "ollama", is not masked inside "ollama/llama3")
_KEYS: set[str] = set()
_KEY_RES: list[tuple[re.Pattern[str], str]] = []  # (the key as a token, what stands for it: "sk-***" as below)


def keep_secret(key: str | None) -> None:
    key = (key or "").strip()
    if len(key) >= 4 and key not in _KEYS:
        _KEYS.add(key)
        _KEY_RES.append((re.compile(r"(?<![\w/.-])" + re.escape(key) + r"(?![\w/.-])"),
                         "sk-***" if key.startswith("sk-") else "***"))
        _KEY_RES.sort(key=lambda r: -len(r[0].pattern))


def redact(text: str) -> str:
    for key_re, masked in _KEY_RES:
        text = key_re.sub(masked, text)
    return _CREDENTIAL.sub(lambda m: (m.group(1) or "sk-") + "***", text)


def _map_error(exc: BaseException, provider: str, sdk: Any, base: type[Exception]) -> LLMError | None:
    """The `LLMError` for an SDK or transport exception (credentials in its wording masked); None for anything
    else (a bug: let it raise)."""
    if isinstance(exc, LLMError):
        return exc
    err = _sdk_error(exc, provider, sdk, base)
    if err is not None:
        err.message = redact(err.message)
        err.args = (err.message,)
    return err


# 429s that waiting does not cure: the account is out of credit (OpenAI `insufficient_quota`).
_NOT_RETRYABLE_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


# A 429 saying the account is out of credit is marked `x-should-retry: false`, which the OpenAI SDK obeys: it retried
# it like a rate limit (three calls where the README promises one), though waiting does not cure it.
def _without_credit(response: Any) -> bool:
    return response.status_code == 429 and "x-should-retry" not in response.headers


def _mark_without_credit(response: Any, body: bytes) -> None:
    if any(code.encode() in body for code in _NOT_RETRYABLE_CODES):
        response.headers["x-should-retry"] = "false"


async def _no_retry_without_credit(response: Any) -> None:
    if _without_credit(response):
        _mark_without_credit(response, await response.aread())


def _no_retry_without_credit_sync(response: Any) -> None:
    if _without_credit(response):
        _mark_without_credit(response, response.read())


def openai_http_client(openai: Any, *, sync: bool = False) -> Any:
    """An HTTP client for the OpenAI SDK (the async one, or the sync one the embedder also uses), with that hook."""
    if sync:
        return openai.DefaultHttpxClient(event_hooks={"response": [_no_retry_without_credit_sync]})
    return openai.DefaultAsyncHttpxClient(event_hooks={"response": [_no_retry_without_credit]})


def _sdk_error(exc: BaseException, provider: str, sdk: Any, base: type[Exception]) -> LLMError | None:
    if isinstance(exc, sdk.APIStatusError) and exc.status_code >= 400:
        status = exc.status_code
        detail = _api_message(exc.body) or exc.message
        what = {401: "authentication failed (check the API key)", 403: "permission denied",
                404: "not found (check the model name and base URL)", 429: "rate limited"}.get(
            status, "server error" if status >= 500 else "request rejected")
        codes = {_api_type(exc.body), _api_error_obj(exc.body).get("code")}
        response = getattr(exc, "response", None)
        retryable = ((status in RETRYABLE_STATUS or status >= 500) and not codes & _NOT_RETRYABLE_CODES
                     # the server's own word, which the SDKs obey too
                     and (response is None or response.headers.get("x-should-retry", "").lower() != "false"))
        return LLMError(f"{provider}: {what} (HTTP {status}): {detail}", provider=provider, status=status,
                        retryable=retryable)
    if isinstance(exc, sdk.APIConnectionError):  # includes timeouts
        why = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
        return LLMError(f"{provider}: connection failed: {exc.message}{why}", retryable=True, provider=provider)
    if isinstance(exc, sdk.APIResponseValidationError):
        return LLMError(f"{provider}: unexpected response: {exc.message}", retryable=False, provider=provider)
    if isinstance(exc, sdk.APIError):  # an error event inside a 200 stream
        kind = _api_type(exc.body)
        return LLMError(f"{provider}: error during the reply ({kind or 'unknown'}): "
                        f"{_api_message(exc.body) or exc.message}", retryable=kind in RETRYABLE_TYPES,
                        provider=provider)
    if isinstance(exc, json.JSONDecodeError):  # a body that claims to be JSON and is not
        return LLMError(f"{provider}: unusable reply (not JSON: {exc})", retryable=False, provider=provider)
    if isinstance(exc, _transport_errors()):
        return LLMError(f"{provider}: connection lost: {exc or type(exc).__name__}", retryable=True,
                        provider=provider)
    if isinstance(exc, base):  # the SDK's own root error, e.g. a missing credential
        return LLMError(f"{provider}: {exc}", retryable=False, provider=provider)
    return None


@contextmanager
def _unusable(provider: str, resp: Any) -> Iterator[None]:
    """Reading a 200 reply that is not the API's shape (a proxy's HTML page, a field missing or null) raises
    an LLMError that says so, not an AttributeError deep in the caller."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        raise LLMError(f"{provider}: unusable reply ({type(exc).__name__}: {exc}): {str(resp)[:120]!r}",
                       retryable=False, provider=provider) from exc


def _api_error_obj(body: object) -> dict:
    if isinstance(body, dict):
        inner = body.get("error")
        return inner if isinstance(inner, dict) else body
    return {}


def _api_message(body: object) -> str | None:
    msg = _api_error_obj(body).get("message")
    return msg if isinstance(msg, str) else (body if isinstance(body, str) and body else None)


def _api_type(body: object) -> str | None:
    err = _api_error_obj(body)
    kind = err.get("type") if err.get("type") != "error" else None
    return kind or err.get("code")


def _rejects_temperature(exc: Any, sent: dict) -> bool:
    """A 400 that blames the temperature we sent (unsupported or deprecated for this model)."""
    return "temperature" in sent and "temperature" in f"{exc.message} {_api_message(exc.body) or ''}".lower()


def _anthropic_usage(u: Any) -> Usage:
    # Some Anthropic-compatible endpoints leave usage (or parts of it) out.
    return Usage(getattr(u, "input_tokens", 0) or 0, getattr(u, "output_tokens", 0) or 0)


def _openai_usage(u: Any) -> Usage:
    # Some OpenAI-compatible servers leave usage (or parts of it) out.
    return Usage(getattr(u, "prompt_tokens", 0) or 0, getattr(u, "completion_tokens", 0) or 0)


# OpenAI reasoning models (o1, o3, o4-mini, gpt-5…): `reasoning_effort`, and output room for the reasoning.
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")
REASONING_HEADROOM = 1024
# A request's timeout (STUDYHALL_LLM_TIMEOUT_S) grows with a long reply it may get (a generation's 4,096
# tokens): the first byte of an unstreamed reply comes at its end.
LONG_REPLY_TOKENS = 1024
SECONDS_PER_TOKEN = 0.05


def _timeout_for(timeout: float, max_tokens: int) -> float:
    return timeout + max(0, max_tokens - LONG_REPLY_TOKENS) * SECONDS_PER_TOKEN


class OpenAIChat:
    """OpenAI chat completions via the official SDK; any OpenAI-compatible server via `base_url`."""

    name = "openai"

    def __init__(self, api_key: str | None, model: str, base_url: str | None = None, timeout: float = 60,
                 *, max_retries: int = 2, max_tokens_field: str | None = None) -> None:
        import openai

        self.model = model
        self._sdk = openai
        keep_secret(api_key)
        # Self-hosted servers often need no key, but the SDK refuses to start without one.
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "unused", base_url=base_url, timeout=timeout, max_retries=max_retries,
            http_client=openai_http_client(openai))
        self._timeout = timeout
        # OpenAI's reasoning models reject `max_tokens`; compatible servers often only know it. A server that
        # refuses the one we send gets the other from then on (Azure, OpenAI's regional hosts, old vLLM).
        official = (self._client.base_url.host or "").endswith("api.openai.com")
        self.max_tokens_field = max_tokens_field or ("max_completion_tokens" if official else "max_tokens")
        self._send_temperature = True
        self._stream_options = True  # usage in the last chunk; some compatible servers refuse the option
        # Reasoning models spend the output budget on hidden reasoning first: a low effort and room for it, so a
        # short reply is not all reasoning and no text (dropped if the server refuses the parameter).
        self._reasoning = official and bool(_REASONING_MODEL.match(model))

    def _adapt(self, exc: Any, params: dict, extra: dict) -> bool:
        """Change what a 400/422 blames on a parameter we can do without or name otherwise; False: nothing to
        change (the error stands)."""
        text = f"{exc.message} {_api_message(exc.body) or ''} {exc.body}"  # (a validation error's body: a list)
        param = _api_error_obj(exc.body).get("param")
        blames = (lambda name: param == name) if isinstance(param, str) and param else (
            lambda name: re.search(rf"\b{name}\b", text) is not None)
        if "temperature" in params and (blames("temperature") or _rejects_temperature(exc, params)):
            self._send_temperature = False  # reasoning models (o-series, gpt-5) take only the default
            params.pop("temperature")
        elif "stream_options" in extra and blames("stream_options"):
            self._stream_options = False
            extra.pop("stream_options")
        elif "reasoning_effort" in params and blames("reasoning_effort"):
            self._reasoning = False
            params.pop("reasoning_effort")
        elif blames(self.max_tokens_field):
            other = "max_tokens" if self.max_tokens_field == "max_completion_tokens" else "max_completion_tokens"
            params[other] = params.pop(self.max_tokens_field)
            self.max_tokens_field = other
        else:
            return False
        logger.info("%s model %s refused a parameter; adapted (%s)", self.name, self.model, redact(text)[:200])
        return True

    async def _create(self, params: dict, **extra: Any) -> Any:
        params, extra = dict(params), dict(extra)
        for _ in range(4):  # each parameter is adapted at most once
            try:
                return await self._client.chat.completions.create(**params, **extra)
            except (self._sdk.BadRequestError, self._sdk.UnprocessableEntityError) as exc:
                if not self._adapt(exc, params, extra):
                    raise
        return await self._client.chat.completions.create(**params, **extra)

    def _params(self, messages: list[Message], system: str | None, max_tokens: int,
                temperature: float | None) -> dict:
        _check(messages)
        msgs: list[dict] = ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in messages]
        params: dict = {"model": self.model, "messages": msgs, self.max_tokens_field: max_tokens}
        if self._reasoning:
            params.update({"reasoning_effort": "low", self.max_tokens_field: max_tokens + REASONING_HEADROOM})
        if temperature is not None and self._send_temperature:
            params["temperature"] = temperature
        # a long reply takes its time before the first byte when not streamed
        params["timeout"] = _timeout_for(self._timeout, max_tokens)
        return params

    def _error(self, exc: BaseException) -> LLMError | None:
        return _map_error(exc, self.name, self._sdk, self._sdk.OpenAIError)

    async def complete(self, messages: list[Message], *, system: str | None = None, max_tokens: int = 512,
                       temperature: float | None = 0.2) -> Completion:
        """The whole reply at once."""
        params = self._params(messages, system, max_tokens, temperature)
        t0 = time.monotonic()
        try:
            resp = await self._create(params)
        except Exception as exc:
            if (err := self._error(exc)) is None:
                raise
            raise err from exc
        with _unusable(self.name, resp):
            if not resp.choices:
                raise LLMError(f"{self.name}: the reply had no choices", retryable=True, provider=self.name)
            choice = resp.choices[0]
            self._refused(getattr(choice.message, "refusal", None), choice.finish_reason)
            return Completion(storable(choice.message.content or ""), _openai_usage(resp.usage),
                              resp.model or self.model, self.name, time.monotonic() - t0,
                              truncated=choice.finish_reason == "length")

    def _refused(self, refusal: str | None, finish_reason: str | None) -> None:
        """A refusal or a content filter is no answer (nor a retryable failure)."""
        if refusal:
            raise LLMError(f"{self.name}: the model refused: {refusal[:200]}", retryable=False, provider=self.name,
                           refused=True)
        if finish_reason == "content_filter":
            raise LLMError(f"{self.name}: the reply was stopped by the provider's content filter", retryable=False,
                           provider=self.name, refused=True)

    def stream(self, messages: list[Message], *, system: str | None = None, max_tokens: int = 512,
               temperature: float | None = 0.2) -> LLMStream:
        """The reply as text deltas; `usage` comes from the final chunk (`include_usage`)."""
        params = self._params(messages, system, max_tokens, temperature)
        return LLMStream(self.name, self.model, self._raw_stream(params), self._error)

    async def _raw_stream(self, params: dict) -> AsyncIterator[str | Usage | _End]:
        usage, model, finished, truncated = Usage(), "", False, False
        extra: dict = {"stream_options": {"include_usage": True}} if self._stream_options else {}
        try:
            chunks = await self._create(params, stream=True, **extra)
        except self._sdk.BadRequestError as exc:
            if _api_error_obj(exc.body).get("param") != "stream":
                raise
            # this model may not be streamed here (OpenAI: an organization not verified for it): the whole reply
            # as one delta
            logger.info("%s model %s cannot be streamed here; answering at once", self.name, self.model)
            resp = await self._create(params)
            with _unusable(self.name, resp):
                choice = resp.choices[0]
                self._refused(getattr(choice.message, "refusal", None), choice.finish_reason)
                usage = _openai_usage(resp.usage)
                yield usage
                yield choice.message.content or ""
                yield _End(usage, resp.model or self.model, choice.finish_reason == "length")
            return
        async with chunks:
            async for chunk in chunks:
                model = chunk.model or model
                if chunk.usage:
                    usage = _openai_usage(chunk.usage)
                    yield usage
                for choice in chunk.choices[:1]:
                    finished = finished or choice.finish_reason is not None
                    truncated = truncated or choice.finish_reason == "length"
                    self._refused(getattr(choice.delta, "refusal", None) if choice.delta else None,
                                  choice.finish_reason)
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
        # A connection closed cleanly mid-reply ends the SDK's iterator without an error.
        if not finished:
            raise LLMError(f"{self.name}: the stream ended before the reply was complete", retryable=True,
                           provider=self.name)
        yield _End(usage, model, truncated)


class AnthropicChat:
    """Anthropic messages via the official SDK."""

    name = "anthropic"

    def __init__(self, api_key: str | None, model: str, base_url: str | None = None, timeout: float = 60,
                 *, max_retries: int = 2) -> None:
        import anthropic

        self.model = model
        self._sdk = anthropic
        keep_secret(api_key)
        # An explicit key also stops the SDK from reading credentials from the environment or profiles.
        self._client = anthropic.AsyncAnthropic(api_key=api_key or "unused", base_url=base_url, timeout=timeout,
                                                max_retries=max_retries)
        self._timeout = timeout
        self._send_temperature = True

    def _stopped(self, stop_reason: str | None) -> bool:
        """True when the reply was cut at a limit; a refusal is no answer (nor a retryable failure)."""
        if stop_reason == "refusal":
            raise LLMError(f"{self.name}: the model refused to answer", retryable=False, provider=self.name,
                           refused=True)
        return stop_reason in ("max_tokens", "model_context_window_exceeded")

    def _params(self, messages: list[Message], system: str | None, max_tokens: int,
                temperature: float | None) -> dict:
        _check(messages)
        params: dict = {"model": self.model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens}
        if system:
            params["system"] = system
        # SDK 1.0 dropped the typed `temperature` argument; the API still takes it, except on newer
        # models, which answer 400 "temperature is deprecated for this model".
        if temperature is not None and self._send_temperature:
            params["extra_body"] = {"temperature": temperature}
        params["timeout"] = _timeout_for(self._timeout, max_tokens)
        return params

    async def _create(self, params: dict, **extra: Any) -> Any:
        try:
            return await self._client.messages.create(**params, **extra)
        except self._sdk.BadRequestError as exc:
            if not _rejects_temperature(exc, params.get("extra_body") or {}):
                raise
        self._send_temperature = False
        logger.info("%s model %s rejects temperature; sending none from now on", self.name, self.model)
        params = {k: v for k, v in params.items() if k != "extra_body"}
        return await self._client.messages.create(**params, **extra)

    def _error(self, exc: BaseException) -> LLMError | None:
        return _map_error(exc, self.name, self._sdk, self._sdk.AnthropicError)

    async def complete(self, messages: list[Message], *, system: str | None = None, max_tokens: int = 512,
                       temperature: float | None = 0.2) -> Completion:
        """The whole reply at once."""
        params = self._params(messages, system, max_tokens, temperature)
        t0 = time.monotonic()
        try:
            resp = await self._create(params)
        except Exception as exc:
            if (err := self._error(exc)) is None:
                raise
            raise err from exc
        with _unusable(self.name, resp):
            text = "".join(block.text for block in resp.content if block.type == "text")
            truncated = self._stopped(getattr(resp, "stop_reason", None))
            return Completion(storable(text), _anthropic_usage(getattr(resp, "usage", None)), resp.model or self.model,
                              self.name, time.monotonic() - t0, truncated=truncated)

    def stream(self, messages: list[Message], *, system: str | None = None, max_tokens: int = 512,
               temperature: float | None = 0.2) -> LLMStream:
        """The reply as text deltas; input tokens from `message_start`, output tokens from `message_delta`."""
        params = self._params(messages, system, max_tokens, temperature)
        return LLMStream(self.name, self.model, self._raw_stream(params), self._error)

    async def _raw_stream(self, params: dict) -> AsyncIterator[str | Usage | _End]:
        input_tokens = output_tokens = 0
        model, stopped, truncated = "", False, False
        async with await self._create(params, stream=True) as events:
            async for ev in events:
                if ev.type == "message_start":
                    model = ev.message.model
                    usage = _anthropic_usage(getattr(ev.message, "usage", None))
                    input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
                    yield Usage(input_tokens, output_tokens)
                elif ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                    yield ev.delta.text
                elif ev.type == "message_delta":
                    # Cumulative counts; input_tokens is only sometimes repeated here.
                    usage = _anthropic_usage(getattr(ev, "usage", None))
                    output_tokens = usage.output_tokens or output_tokens
                    input_tokens = usage.input_tokens or input_tokens
                    yield Usage(input_tokens, output_tokens)
                    truncated = self._stopped(getattr(getattr(ev, "delta", None), "stop_reason", None))
                elif ev.type == "message_stop":
                    stopped = True
        if not stopped:
            raise LLMError(f"{self.name}: the stream ended before the reply was complete", retryable=True,
                           provider=self.name)
        yield _End(Usage(input_tokens, output_tokens), model, truncated)


def first_json_object(text: str) -> str:
    """The first JSON object in a model's reply; prose after it (braces included) is ignored. ValueError when
    there is none."""
    start = text.find("{")
    if start < 0:
        raise ValueError("the model's reply holds no JSON object")
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the model's reply holds no valid JSON object: {exc}") from None
    except RecursionError:
        raise ValueError("the model's reply nests its JSON too deeply") from None
    return text[start:end]


def json_objects(text: str) -> list[str]:
    """Every top-level JSON object in a model's reply, in order (text and broken JSON between them skipped)."""
    out, decoder = [], json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            _, end = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            start = text.find("{", start + 1)
            continue
        out.append(text[start:end])
        start = text.find("{", end)
    return out


@functools.cache
def get_llm(settings: Settings) -> LLM | None:
    """The configured chat model, one instance per settings; None means use the offline extractive path.

    `STUDYHALL_LLM` ('extractive' | 'openai' | 'anthropic') wins; otherwise OpenAI when a key or base URL
    is set, else Anthropic when a key is set. The SDK clients hold a connection pool: use the instance
    from one event loop.
    """
    choice = (settings.llm_provider or "").strip().lower() or None
    if choice not in (None, "auto", "extractive", "openai", "anthropic"):
        raise ValueError(f"unknown STUDYHALL_LLM {settings.llm_provider!r}; expected extractive, openai or anthropic")
    if choice in (None, "auto"):
        if settings.openai_api_key or settings.openai_base_url:
            choice = "openai"
        elif settings.anthropic_api_key:
            choice = "anthropic"
        else:
            return None
    if choice == "extractive":
        return None
    if choice == "openai":
        if not (settings.openai_api_key or settings.openai_base_url):
            raise LLMError("STUDYHALL_LLM=openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local server)",
                           retryable=False, provider="openai")
        return OpenAIChat(settings.openai_api_key, settings.openai_model, settings.openai_base_url,
                          timeout=settings.llm_timeout_s)
    if not (settings.anthropic_api_key or settings.anthropic_base_url):
        raise LLMError("STUDYHALL_LLM=anthropic needs ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL)", retryable=False,
                       provider="anthropic")
    return AnthropicChat(settings.anthropic_api_key, settings.anthropic_model, settings.anthropic_base_url,
                         timeout=settings.llm_timeout_s)


# USD per million (input, output) tokens at list price (early 2026); update when they change. Cached and
# batch discounts are ignored, so this is an upper bound for those calls.
PRICES_PER_MTOK: dict[tuple[str, str], tuple[float, float]] = {
    ("openai", "gpt-4o-mini"): (0.15, 0.60),
    ("openai", "gpt-4o"): (2.50, 10.00),
    ("openai", "gpt-4.1"): (2.00, 8.00),
    ("openai", "gpt-4.1-mini"): (0.40, 1.60),
    ("openai", "gpt-4.1-nano"): (0.10, 0.40),
    ("openai", "gpt-5"): (1.25, 10.00),
    ("openai", "gpt-5-mini"): (0.25, 2.00),
    ("openai", "gpt-5-nano"): (0.05, 0.40),
    ("anthropic", "claude-sonnet-4-6"): (3.00, 15.00),
    ("anthropic", "claude-sonnet-4-5"): (3.00, 15.00),
    ("anthropic", "claude-sonnet-4"): (3.00, 15.00),
    ("anthropic", "claude-haiku-4-5"): (1.00, 5.00),
    ("anthropic", "claude-3-5-haiku"): (0.80, 4.00),
    ("anthropic", "claude-opus-4-6"): (5.00, 25.00),
    ("anthropic", "claude-opus-4-5"): (5.00, 25.00),
    ("anthropic", "claude-opus-4-1"): (15.00, 75.00),
    ("anthropic", "claude-opus-4"): (15.00, 75.00),
    ("anthropic", "claude-opus-4-0"): (15.00, 75.00),
    ("anthropic", "claude-sonnet-4-0"): (3.00, 15.00),
    ("openai", "gpt-4o-2024-05-13"): (5.00, 15.00),  # the first gpt-4o snapshot kept its launch price
}
# Servers report dated snapshots: gpt-4o-mini-2024-07-18, claude-sonnet-4-5-20250929, claude-3-5-haiku-latest.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


def estimate_cost_usd(provider: str, model: str, usage: Usage) -> float | None:
    """List-price cost of one call, or None for a model not in `PRICES_PER_MTOK` (e.g. self-hosted)."""
    price = PRICES_PER_MTOK.get((provider, model)) or PRICES_PER_MTOK.get((provider, _SNAPSHOT.sub("", model)))
    if price is None:
        return None
    return (usage.input_tokens * price[0] + usage.output_tokens * price[1]) / 1_000_000
