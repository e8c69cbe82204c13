"""Hybrid search over a course's chunks: pgvector HNSW cosine + BM25 over Postgres full-text lexemes, fused.

Only chunks embedded by the query's model are searched: vectors of different models never mix.
"""
from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import numpy as np

from store.frames import CLINGING  # dropped on both sides, as sh_fold drops them
from store.vectors import stored

CANDIDATES = 50
BM25_K1 = 1.2
BM25_B = 0.75
# Fusion: a convex mix of min-max normalised scores (dense cosine, BM25). Weights tuned on ../shared/eval
# with bench/search_quality.py; see README "Search quality".
SPARSE_WEIGHT = 0.2
# BM25 reads whole posting lists only for the query's rarest terms, up to this many postings in all; see _HYBRID.
POSTINGS_BUDGET = 1500
# BM25 with idf and length normalisation factored: w = (k1 + 1) * idf per term, then per posting
# w * tf / (tf + k1 * (1 - b) + k1 * b * dl / avgdl).
_K1_PLUS_1 = round(BM25_K1 + 1, 9)
_K1_FLAT = round(BM25_K1 * (1 - BM25_B), 9)
_K1_B = round(BM25_K1 * BM25_B, 9)

# Words in any script ("schrödinger", "café", "naïve", "हिन्दी" with its vowel signs), not only ASCII: the question
# is cut at punctuation, symbols and spaces, as Postgres cuts a chunk (sh_fold turns Unicode punctuation into
# spaces, migration 0034), keeping what Postgres reads as one word ("it's", "k-means", "3.14"). Postgres folds the
# accents of both sides (sh_fold, migration 0022), so "schrodinger" finds "Schrödinger" and the other way round.
_INNER = "'’-.\u200c\u200d"  # inside a word only (the zero-width (non-)joiners are spelling: Persian, Indic)

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
    primary_dense: float | None = None  # an ensemble's primary member's own cosine (see hybrid_search's `primary`)
    sparse_score: float | None = None
    sentences: list = field(default_factory=list)


@functools.lru_cache(maxsize=8192)
def _breaks(ch: str) -> bool:
    """Whether a character ends a word: punctuation, symbols, spaces, controls (not letters, digits, marks)."""
    return ch not in _INNER and unicodedata.category(ch)[0] in "PSZC"


def terms(text: str) -> list[str]:
    """The words of `text`, lower-cased. (NFC first: a decomposed "Gödel" is one word, not "go" and "del".)"""
    text = CLINGING.sub("", unicodedata.normalize("NFC", text).lower())
    spaced = "".join(" " if _breaks(ch) else ch for ch in text)
    return [t for t in (w.strip(_INNER) for w in spaced.split()) if t]


def keyword_text(question: str, *, question_words: bool = True) -> str:
    """The question without question-only words, for the full-text side (`question_words=False`: a search box's
    query, where "mean" or "example" is what is looked for, keeps them)."""
    return " ".join(t for t in terms(question) if not question_words or t not in _QUESTION_STOP)


_DENSE = """
SELECT c.id FROM chunks c
WHERE c.course_id = $2 AND c.embed_model = $3 AND ($4::bigint IS NULL OR c.video_id = $4)
ORDER BY c.embedding <=> $1 LIMIT $5
"""

# One round trip: dense candidates, BM25 candidates, min-max normalisation, convex fusion, and the rows.
# $1 query vector, $2 course, $3 model, $4 keyword text, $5::float8 sparse weight, [$6 video].
# Planning this statement costs about as much as running its BM25 side, so it is written to be planned once per
# connection: candidate counts and k are written into the text (see _statement), and the keyword text (and, for
# the HNSW statement, the course) reach the query through sub-selects, which hide their values from the planner.
# Custom plans then cost what the generic one does, and after five executions Postgres keeps the generic plan.
#
# BM25: df and N come from course_term_df / course_term_stats, so each term's idf is known before any posting is
# read. The query's terms are read rarest first while the postings read stay within POSTINGS_BUDGET (the rarest
# term always); those "essential" terms pick the candidates. The commoner terms (small idf, long posting lists)
# then only score those candidates, one primary-key probe per (term, candidate), instead of being read whole.
# A chunk holding none of the essential terms can be missed; when the whole query is within budget (any small
# course) the ranking is exact BM25.
_HYBRID = f"""
WITH dense AS (
    SELECT c.id, 1 - (c.embedding <=> $1) AS s FROM chunks c
    WHERE c.course_id = {{course}} AND c.embed_model = {{model}} {{video_filter}}
    ORDER BY {{dense_order}} LIMIT {{candidates}}),
terms AS (
    SELECT d.lexeme,
           sum(d.df) OVER by_df <= {{budget}} OR row_number() OVER by_df = 1 AS essential,
           {_K1_PLUS_1}::float8 * ln(1 + (s.n_chunks - d.df + 0.5::float8) / (d.df + 0.5::float8)) AS w,
           {_K1_B}::float8 / greatest(s.total_terms::float8 / greatest(s.n_chunks, 1), 1) AS per_len
    FROM course_term_stats s JOIN course_term_df d ON d.course_id = s.course_id AND d.embed_model = s.embed_model
    WHERE $5::float8 > 0 AND s.course_id = {{course}} AND s.embed_model = {{model}}
      AND d.lexeme = ANY ((SELECT tsvector_to_array(to_tsvector('english', sh_fold($4::text))))::text[])
    WINDOW by_df AS (ORDER BY d.df, d.lexeme)),
-- LATERAL: one primary-key range scan per essential term, whatever the planner believes about table sizes (OFFSET 0
-- keeps the subquery from being flattened into a join the planner may turn into a scan of the whole course)
partial AS (
    SELECT t.chunk_id AS id, sum(q.w * t.tf / (t.tf + {_K1_FLAT}::float8 + q.per_len * t.dl)) AS s
    FROM terms q CROSS JOIN LATERAL (
        SELECT chunk_id, video_id, tf, dl FROM chunk_terms
        WHERE course_id = {{course}} AND embed_model = {{model}} AND lexeme = q.lexeme OFFSET 0) t
    WHERE q.essential {{posting_filter}}
    GROUP BY t.chunk_id ORDER BY s DESC, t.chunk_id LIMIT {{candidates}}),
-- LIMIT 1 keeps each probe a parameterised index lookup (the planner would otherwise read the whole list)
rest AS (
    SELECT p.id, q.w * t.tf / (t.tf + {_K1_FLAT}::float8 + q.per_len * t.dl) AS s
    FROM terms q CROSS JOIN partial p CROSS JOIN LATERAL (
        SELECT tf, dl FROM chunk_terms
        WHERE course_id = {{course}} AND embed_model = {{model}} AND lexeme = q.lexeme AND chunk_id = p.id
        LIMIT 1) t
    WHERE NOT q.essential),
sparse AS (SELECT p.id, p.s + coalesce(sum(r.s), 0) AS s FROM partial p LEFT JOIN rest r USING (id) GROUP BY p.id, p.s),
dn AS (SELECT id, s, coalesce((s - min(s) OVER ()) / nullif(max(s) OVER () - min(s) OVER (), 0), 1) AS n FROM dense),
sn AS (SELECT id, s, coalesce((s - min(s) OVER ()) / nullif(max(s) OVER () - min(s) OVER (), 0), 1) AS n FROM sparse),
fused AS (
    SELECT id, (1 - $5::float8) * coalesce(dn.n, 0) + $5::float8 * coalesce(sn.n, 0) AS score, dn.s AS ds, sn.s AS ss
    FROM dn FULL JOIN sn USING (id) ORDER BY score DESC, id LIMIT {{k}})
SELECT (SELECT count(*) FROM dense) AS dense_n,
       (SELECT n_chunks FROM course_term_stats WHERE course_id = {{course}} AND embed_model = {{model}}) AS course_n,
       f.id, f.score, f.ds, f.ss, {{primary}} AS ps, c.video_id, v.title AS video_title, v.youtube_id, c.position,
       c.start_s, c.end_s, c.text, c.sentences
FROM fused f JOIN chunks c ON c.id = f.id JOIN videos v ON v.id = c.video_id
ORDER BY f.score DESC, f.id
"""


@functools.lru_cache(maxsize=64)
def _statement(candidates: int, k: int, *, exact: bool, video: bool, primary: int | None = None) -> str:
    return _HYBRID.format(
        # the dot product of the first `primary` components (pgvector 0.6 has no subvector(): through real[]), for
        # the dense side's candidates only, as `ds` (a hit BM25 alone found has neither)
        primary="NULL::float8" if primary is None else
        f"CASE WHEN f.ds IS NOT NULL THEN -((c.embedding::real[])[1:{int(primary)}]::vector "
        f"<#> ($1::real[])[1:{int(primary)}]::vector) END",
        candidates=int(candidates), k=int(k), budget=POSTINGS_BUDGET,
        # "+ 0" keeps the planner off HNSW: an exact ranking of the course's (or video's) chunks
        dense_order="(c.embedding <=> $1) + 0" if exact else "c.embedding <=> $1",
        # The HNSW statement's plan suits every course, so the course is hidden from the planner too (else a
        # connection whose first searches were in small courses would plan every later search). The exact one
        # needs the course's own estimates to pick its index over a scan of every course's chunks.
        course="$2" if exact else "(SELECT $2::bigint)", model="$3" if exact else "(SELECT $3::text)",
        video_filter="AND c.video_id = $6" if video else "",
        posting_filter="AND t.video_id = $6" if video else "")


# A course of at most this many chunks is ranked exactly (a scan of its own chunks through the course index is a
# few ms): a course-filtered HNSW walk over every course's chunks loses recall as the graph fills with other
# courses' near copies (the same YouTube lecture in many courses; a cloned course). With 17 copies of a course in
# the index, the walk still returned 50 of its chunks, but not its nearest: the tutor cited the wrong lecture.
EXACT_COURSE_MAX = 2000
# (course, model) -> chunk count, as last seen (per process: each search's reply carries the count, so a course
# that grows past EXACT_COURSE_MAX walks the graph from its next search on; forgotten when the map fills up).
_course_sizes: dict[tuple[int, str], int] = {}


def _remember_size(key: tuple[int, str], n: int) -> None:
    if len(_course_sizes) >= 10_000:
        _course_sizes.clear()
    _course_sizes[key] = n


async def _course_size(conn: asyncpg.Connection, key: tuple[int, str]) -> int:
    if key not in _course_sizes:
        _remember_size(key, int(await conn.fetchval(
            "SELECT n_chunks FROM course_term_stats WHERE course_id = $1 AND embed_model = $2", *key) or 0))
    return _course_sizes[key]


async def hybrid_search(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, query_text: str,
                        embed_model: str, *, k: int = 5, video_id: int | None = None,
                        w_sparse: float = SPARSE_WEIGHT, candidates: int = CANDIDATES,
                        primary: tuple[int, float] | None = None, question: bool = True) -> list[Hit]:
    """Top-k chunks of the course for a question (its embedding and its text), in one query. `question=False`:
    a search box's query (its words all count on the full-text side, see `keyword_text`).

    `primary` (width, weight), for an ensemble's vectors (agents.embedder.Ensemble.primary_slice): each hit also
    carries `primary_dense`, its first member's own cosine, on the scale thresholds were set on."""
    args: tuple = (stored(query_vec), course_id, embed_model, keyword_text(query_text, question_words=question),
                   float(w_sparse))
    key = (course_id, embed_model)
    width = primary[0] if primary else None
    if video_id is not None:  # one video's chunks: ranked exactly (an HNSW walk would mostly find other videos)
        rows = await conn.fetch(_statement(candidates, k, exact=True, video=True, primary=width), *args, video_id)
    elif await _course_size(conn, key) <= EXACT_COURSE_MAX:
        rows = await conn.fetch(_statement(candidates, k, exact=True, video=False, primary=width), *args)
    else:
        rows = await conn.fetch(_statement(candidates, k, exact=False, video=False, primary=width), *args)
        # A course-filtered HNSW walk can come back short (the course is a small part of the index, or the graph
        # holds deleted rows); then rank the course's chunks exactly.
        want = min(candidates, int(rows[0]["course_n"] or 0)) if rows else 1
        if not rows or rows[0]["dense_n"] < want:
            rows = await conn.fetch(_statement(candidates, k, exact=True, video=False, primary=width), *args)
    if rows and video_id is None:
        _remember_size(key, int(rows[0]["course_n"] or 0))
    return [Hit(chunk_id=r["id"], video_id=r["video_id"], video_title=r["video_title"], youtube_id=r["youtube_id"],
                position=r["position"], start=r["start_s"], end=r["end_s"], text=r["text"],
                score=round(r["score"], 6), dense_score=r["ds"], sparse_score=r["ss"], sentences=r["sentences"],
                primary_dense=None if primary is None or r["ps"] is None else r["ps"] / primary[1])
            for r in rows]


async def dense_search(conn: asyncpg.Connection, course_id: int, query_vec: np.ndarray, embed_model: str,
                       k: int = 5) -> list[int]:
    """Bare pgvector top-k (the benchmark's baseline)."""
    return [r["id"] for r in await conn.fetch(_DENSE, stored(query_vec), course_id, embed_model, None, k)]


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
    return [_unscored(r) for r in rows]


def _unscored(r: asyncpg.Record) -> Hit:
    """A chunk read by position or time, not ranked (columns as `_NEIGHBOURS` names them)."""
    return Hit(chunk_id=r["id"], video_id=r["video_id"], video_title=r["video_title"], youtube_id=r["youtube_id"],
               position=r["position"], start=r["start_s"], end=r["end_s"], text=r["text"], score=0.0,
               sentences=r["sentences"])


# A word of one of the course's video titles counts as said too (a title is the course's, and the tutor's own
# follow-up questions quote titles). (sh_fold straightens curly apostrophes.)
_VOCAB = """
WITH t AS MATERIALIZED (
    SELECT tsvector_to_array(to_tsvector('english', titles)) AS lexemes,
           regexp_split_to_array(titles, '[^a-z0-9''-]+') AS words
    FROM (SELECT lower(sh_fold(coalesce(string_agg(title, ' '), ''))) AS titles FROM videos WHERE course_id = $2) v)
SELECT q.lexeme AS term, false AS spoken,
       EXISTS (SELECT 1 FROM course_term_df d WHERE d.course_id = $2 AND d.embed_model = $3 AND d.lexeme = q.lexeme)
       OR q.lexeme = ANY((SELECT lexemes FROM t)::text[]) AS present
FROM (SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', sh_fold($1)))) AS lexeme) q
UNION ALL
SELECT w, true, EXISTS (SELECT 1 FROM video_words v WHERE v.course_id = $2 AND v.word = w)
                OR w = ANY((SELECT words FROM t)::text[])
FROM unnest($4::text[]) AS w
"""


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of a question the course's transcripts say."""

    present: list[str]  # the question's content lexemes (stemmed) that occur somewhere in the course
    missing: list[str]  # ... and those that occur nowhere
    spoken: set[str]  # which of the looked-up words (lower-cased, unstemmed) some video says


async def course_words_like(conn: asyncpg.Connection, course_id: int, words: Sequence[str]) -> list[str]:
    """The words the course's videos say (as spoken) that start with the same letter as one of `words` and are
    within two letters of its length: the candidates for a misspelt word (`agents.judge.near_spellings`)."""
    if not words:
        return []
    return [r["word"] for r in await conn.fetch(
        """SELECT DISTINCT v.word FROM video_words v, unnest($2::text[]) AS w(q)
           WHERE v.course_id = $1 AND left(v.word, 1) = left(w.q, 1)
             AND length(v.word) BETWEEN length(w.q) - 2 AND length(w.q) + 2""", course_id, list(words))]


async def vocabulary_coverage(conn: asyncpg.Connection, course_id: int, embed_model: str, question: str,
                              words: Sequence[str] = ()) -> Coverage:
    """The question's lexemes present / missing in the course, and which of `words` the videos say as spoken
    (store: course_term_df, video_words); one round trip."""
    rows = await conn.fetch(_VOCAB, keyword_text(question), course_id, embed_model, list(words))
    return Coverage(present=[r["term"] for r in rows if not r["spoken"] and r["present"]],
                    missing=[r["term"] for r in rows if not r["spoken"] and not r["present"]],
                    spoken={r["term"] for r in rows if r["spoken"] and r["present"]})


async def moments_at(conn: asyncpg.Connection, course_id: int,
                     at: float) -> tuple[list[Hit], dict[int, tuple[str, float]]]:
    """What each video of the course says at `at` seconds, as search finds it (a video being ingested again keeps
    its chunks until the new ones replace them): per video, the chunk being said then (or the nearest within 30 s
    before it, 15 s after: a pause, the first words), in the course's video order; and every indexed video's
    (title, end of its last chunk), by id."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (c.video_id) c.id, c.video_id, v.title AS video_title, v.youtube_id, c.position,
                  c.start_s, c.end_s, c.text, c.sentences
           FROM chunks c JOIN videos v ON v.id = c.video_id
           WHERE c.course_id = $1 AND c.start_s <= $2 + 15 AND c.end_s >= $2 - 30
           ORDER BY c.video_id, (c.start_s <= $2 AND c.end_s >= $2) DESC, abs(c.start_s - $2)""", course_id, at)
    hits = [_unscored(r) for r in rows]
    lengths = {r["video_id"]: (r["title"], float(r["ends"])) for r in await conn.fetch(
        """SELECT c.video_id, v.title, max(c.end_s) AS ends FROM chunks c JOIN videos v ON v.id = c.video_id
           WHERE c.course_id = $1 GROUP BY c.video_id, v.title ORDER BY c.video_id""", course_id)}
    return hits, lengths
