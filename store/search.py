"""Hybrid search over a course's chunks: pgvector HNSW cosine + BM25 over Postgres full-text lexemes, fused.

Only chunks embedded by the query's model are searched: vectors of different models never mix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import asyncpg
import numpy as np

CANDIDATES = 50
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
SELECT c.id FROM chunks c
WHERE c.course_id = $2 AND c.embed_model = $3 AND ($4::bigint IS NULL OR c.video_id = $4)
ORDER BY c.embedding <=> $1 LIMIT $5
"""

# One round trip: dense candidates, BM25 candidates, min-max normalisation, convex fusion, and the rows.
# $1 query vector, $2 course, $3 model, $4 video or NULL, $5 candidates per side, $6 keyword text,
# $7::float8 sparse weight, $8 k.
_HYBRID = f"""
WITH dense AS (
    SELECT c.id, 1 - (c.embedding <=> $1) AS s FROM chunks c
    WHERE c.course_id = $2 AND c.embed_model = $3 AND ($4::bigint IS NULL OR c.video_id = $4)
    ORDER BY {{dense_order}} LIMIT $5),
q AS (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', $6))) AS lexeme WHERE $7::float8 > 0),
stats AS (SELECT n_chunks::float8 AS n, greatest(total_terms::float8 / greatest(n_chunks, 1), 1) AS avgdl
          FROM course_term_stats WHERE course_id = $2 AND embed_model = $3),
-- LATERAL: one primary-key range scan per query term, whatever the planner believes about table sizes
postings AS MATERIALIZED (
    SELECT q.lexeme, t.chunk_id, t.video_id, t.tf, t.dl FROM q CROSS JOIN LATERAL (
        SELECT chunk_id, video_id, tf, dl FROM chunk_terms
        WHERE course_id = $2 AND embed_model = $3 AND lexeme = q.lexeme) t),
df AS (SELECT lexeme, count(*)::float8 AS df FROM postings GROUP BY lexeme),
sparse AS (
    SELECT p.chunk_id AS id,
           sum(ln(1 + (s.n - df.df + 0.5) / (df.df + 0.5))
               * p.tf * {BM25_K1 + 1} / (p.tf + {BM25_K1} * (1 - {BM25_B} + {BM25_B} * p.dl / s.avgdl))) AS s
    FROM postings p JOIN df USING (lexeme) CROSS JOIN stats s
    WHERE $4::bigint IS NULL OR p.video_id = $4
    GROUP BY p.chunk_id ORDER BY s DESC, p.chunk_id LIMIT $5),
dn AS (SELECT id, s, coalesce((s - min(s) OVER ()) / nullif(max(s) OVER () - min(s) OVER (), 0), 1) AS n FROM dense),
sn AS (SELECT id, s, coalesce((s - min(s) OVER ()) / nullif(max(s) OVER () - min(s) OVER (), 0), 1) AS n FROM sparse),
fused AS (
    SELECT id, (1 - $7::float8) * coalesce(dn.n, 0) + $7::float8 * coalesce(sn.n, 0) AS score, dn.s AS ds, sn.s AS ss
    FROM dn FULL JOIN sn USING (id) ORDER BY score DESC, id LIMIT $8::int)
SELECT (SELECT count(*) FROM dense) AS dense_n, (SELECT n FROM stats) AS course_n,
       f.id, f.score, f.ds, f.ss, c.video_id, v.title AS video_title, v.youtube_id, c.position, c.start_s, c.end_s,
       c.text, c.sentences
FROM fused f JOIN chunks c ON c.id = f.id JOIN videos v ON v.id = c.video_id
ORDER BY f.score DESC, f.id
"""


_HYBRID_ANN = _HYBRID.format(dense_order="c.embedding <=> $1")
_HYBRID_EXACT = _HYBRID.format(dense_order="(c.embedding <=> $1) + 0")  # "+ 0" keeps the planner off HNSW


async def hybrid_search(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, query_text: str,
                        embed_model: str, *, k: int = 5, video_id: int | None = None,
                        w_sparse: float = SPARSE_WEIGHT, candidates: int = CANDIDATES) -> list[Hit]:
    """Top-k chunks of the course for a question (its embedding and its text), in one query."""
    args = (query_vec, course_id, embed_model, video_id, candidates, keyword_text(query_text), float(w_sparse), k)
    rows = await conn.fetch(_HYBRID_ANN, *args)
    # A course-filtered HNSW walk can come back short (the course is a small part of the index, or the graph
    # holds deleted rows); then rank the course's chunks exactly. Small courses are cheap to scan.
    want = min(candidates, int(rows[0]["course_n"] or 0)) if rows else 1
    if video_id is not None or not rows or rows[0]["dense_n"] < want:
        rows = await conn.fetch(_HYBRID_EXACT, *args)
    return [Hit(chunk_id=r["id"], video_id=r["video_id"], video_title=r["video_title"], youtube_id=r["youtube_id"],
                position=r["position"], start=r["start_s"], end=r["end_s"], text=r["text"],
                score=round(r["score"], 6), dense_score=r["ds"], sparse_score=r["ss"], sentences=r["sentences"])
            for r in rows]


async def dense_search(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, embed_model: str,
                       k: int = 5) -> list[int]:
    """Bare pgvector top-k (the benchmark's baseline)."""
    return [r["id"] for r in await conn.fetch(_DENSE, query_vec, course_id, embed_model, None, k)]


_NEIGHBOURS = """
SELECT c.id, c.video_id, v.title AS video_title, v.youtube_id, c.position, c.start_s, c.end_s, c.text, c.sentences
FROM chunks c JOIN videos v ON v.id = c.video_id
JOIN unnest($1::bigint[], $2::int[]) AS want(video_id, position)
  ON c.video_id = want.video_id AND c.position = want.position
WHERE c.embed_model = $3
"""


async def neighbours(conn: asyncpg.Connection, hits: list[Hit], embed_model: str, span: int = 1) -> list[Hit]:
    """The chunks right before and after each hit (same video), not already among the hits."""
    have = {(h.video_id, h.position) for h in hits}
    want = sorted({(h.video_id, h.position + d) for h in hits for d in range(-span, span + 1) if d} - have)
    if not want:
        return []
    rows = await conn.fetch(_NEIGHBOURS, [w[0] for w in want], [w[1] for w in want], embed_model)
    return [Hit(chunk_id=r["id"], video_id=r["video_id"], video_title=r["video_title"], youtube_id=r["youtube_id"],
                position=r["position"], start=r["start_s"], end=r["end_s"], text=r["text"], score=0.0,
                sentences=r["sentences"]) for r in rows]


_VOCAB = """
SELECT q.lexeme, EXISTS (SELECT 1 FROM chunk_terms t WHERE t.course_id = $2 AND t.embed_model = $3
                                                       AND t.lexeme = q.lexeme) AS present
FROM (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', $1))) AS lexeme) q
"""


async def vocabulary_coverage(conn: asyncpg.Connection, course_id: int, embed_model: str,
                              question: str) -> tuple[list[str], list[str]]:
    """(present, missing): the question's content lexemes that do / do not occur anywhere in the course."""
    rows = await conn.fetch(_VOCAB, keyword_text(question), course_id, embed_model)
    return [r["lexeme"] for r in rows if r["present"]], [r["lexeme"] for r in rows if not r["present"]]
