"""Hybrid search over a course's chunks: pgvector HNSW cosine + BM25 over Postgres full-text lexemes, fused.

Only chunks embedded by the query's model are searched: vectors of different models never mix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import asyncpg
import numpy as np

CANDIDATES = 50
EF_SEARCH = 200
BM25_K1 = 1.2
BM25_B = 0.75
# Fusion: a convex mix of min-max normalised scores (dense cosine, BM25). Weights tuned on ../shared/eval
# with bench/search_quality.py; see README "Search quality".
SPARSE_WEIGHT = 0.3

_TERM = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Words common in questions that say nothing about where the answer is (Postgres drops ordinary stop words).
_QUESTION_STOP = frozenset("""
what which who whom whose when where why how does did do explain mean means meaning describe tell say said
according lecture video professor talk talks discussed discuss example give lecturer speaker course
""".split())


@dataclass(slots=True)
class Hit:
    chunk_id: int
    video_id: int
    video_title: str
    youtube_id: str | None
    position: int
    start: float
    end: float
    text: str
    score: float
    dense_score: float | None = None
    sparse_score: float | None = None
    sentences: list = field(default_factory=list)


def keyword_text(question: str) -> str:
    """The question without question-only words, for the full-text side."""
    return " ".join(t for t in _TERM.findall(question.lower()) if t not in _QUESTION_STOP)


_DENSE = """
SELECT c.id, 1 - (c.embedding <=> $1) AS score FROM chunks c
WHERE c.course_id = $2 AND c.embed_model = $3 AND ($4::bigint IS NULL OR c.video_id = $4)
ORDER BY c.embedding <=> $1 LIMIT $5
"""

_SPARSE = f"""
WITH q AS (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', $1))) AS lexeme),
stats AS (SELECT count(*)::float8 AS n, greatest(avg(n_terms), 1)::float8 AS avgdl
          FROM chunks WHERE course_id = $2 AND embed_model = $3),
df AS (SELECT t.lexeme, count(*)::float8 AS df FROM chunk_terms t JOIN q USING (lexeme)
       JOIN chunks c ON c.id = t.chunk_id
       WHERE t.course_id = $2 AND c.embed_model = $3 GROUP BY t.lexeme)
SELECT t.chunk_id AS id,
       sum(ln(1 + (s.n - df.df + 0.5) / (df.df + 0.5))
           * t.tf * {BM25_K1 + 1} / (t.tf + {BM25_K1} * (1 - {BM25_B} + {BM25_B} * c.n_terms / s.avgdl))) AS score
FROM chunk_terms t JOIN df USING (lexeme) JOIN chunks c ON c.id = t.chunk_id CROSS JOIN stats s
WHERE t.course_id = $2 AND c.embed_model = $3 AND ($4::bigint IS NULL OR c.video_id = $4)
GROUP BY t.chunk_id ORDER BY score DESC, t.chunk_id LIMIT $5
"""

_FETCH = """
SELECT c.id, c.video_id, v.title AS video_title, v.youtube_id, c.position, c.start_s, c.end_s, c.text, c.sentences
FROM chunks c JOIN videos v ON v.id = c.video_id WHERE c.id = ANY($1::bigint[])
"""


def _minmax(scores: dict[int, float]) -> dict[int, float]:
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi - lo < 1e-9:
        return {k: 1.0 for k in scores}
    return {k: (v - lo) / (hi - lo) for k, v in scores.items()}


def fuse(dense: dict[int, float], sparse: dict[int, float], *, w_sparse: float = SPARSE_WEIGHT
         ) -> list[tuple[int, float]]:
    """Convex combination of min-max normalised dense and sparse scores; [(id, score)] best first."""
    nd, ns = _minmax(dense), _minmax(sparse)
    ids = set(nd) | set(ns)
    scored = [(cid, (1 - w_sparse) * nd.get(cid, 0.0) + w_sparse * ns.get(cid, 0.0)) for cid in ids]
    return sorted(scored, key=lambda kv: (-kv[1], kv[0]))


async def candidates(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, query_text: str,
                     embed_model: str, *, video_id: int | None = None, n: int = CANDIDATES,
                     sparse: bool = True) -> tuple[dict[int, float], dict[int, float]]:
    """Dense and BM25 candidate scores by chunk id."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL hnsw.ef_search = {EF_SEARCH}")
        dense = {r["id"]: r["score"] for r in await conn.fetch(_DENSE, query_vec, course_id, embed_model, video_id, n)}
    sp: dict[int, float] = {}
    words = keyword_text(query_text)
    if sparse and words:
        sp = {r["id"]: r["score"] for r in await conn.fetch(_SPARSE, words, course_id, embed_model, video_id, n)}
    return dense, sp


async def fetch_hits(conn: asyncpg.Connection, scored: list[tuple[int, float]], dense: dict[int, float],
                     sparse: dict[int, float]) -> list[Hit]:
    rows = {r["id"]: r for r in await conn.fetch(_FETCH, [cid for cid, _ in scored])}
    hits = []
    for cid, score in scored:
        r = rows.get(cid)
        if r is None:  # replaced by a concurrent re-ingest between the queries
            continue
        hits.append(Hit(chunk_id=cid, video_id=r["video_id"], video_title=r["video_title"], youtube_id=r["youtube_id"],
                        position=r["position"], start=r["start_s"], end=r["end_s"], text=r["text"],
                        score=round(score, 6), dense_score=dense.get(cid), sparse_score=sparse.get(cid),
                        sentences=r["sentences"]))
    return hits


async def hybrid_search(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, query_text: str,
                        embed_model: str, *, k: int = 5, video_id: int | None = None,
                        w_sparse: float = SPARSE_WEIGHT) -> list[Hit]:
    """Top-k chunks of the course for a question (its embedding and its text)."""
    dense, sparse = await candidates(conn, course_id, query_vec, query_text, embed_model, video_id=video_id,
                                     sparse=w_sparse > 0)
    scored = fuse(dense, sparse, w_sparse=w_sparse)[:k]
    return await fetch_hits(conn, scored, dense, sparse) if scored else []


async def dense_search(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, embed_model: str,
                       k: int = 5) -> list[int]:
    """Bare pgvector top-k (the benchmark's baseline)."""
    return [r["id"] for r in await conn.fetch(_DENSE, query_vec, course_id, embed_model, None, k)]
