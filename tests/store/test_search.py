"""The BM25 side of hybrid search against the session's real Postgres: the per-course statistics (df per lexeme,
N, total length) kept by ingest one video at a time always equal a recount from the postings, and reading only
the rarest terms' postings still gives the candidates their exact BM25 scores."""
from __future__ import annotations

import asyncio
import unicodedata
import uuid
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pytest

from store import search
from store import videos as videos_repo
from store.db import create_pool

MODEL = "test-model@1"


@dataclass
class Sentence:
    start: float
    end: float
    text: str


@dataclass
class Chunk:
    position: int
    start: float
    end: float
    text: str
    sentences: list = field(default_factory=list)


def chunks_of(texts: list[str]) -> list[Chunk]:
    return [Chunk(i, i * 10.0, i * 10.0 + 9, t, [Sentence(i * 10.0, i * 10.0 + 9, t)]) for i, t in enumerate(texts)]


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
async def pool(settings):  # type: ignore[no-untyped-def]
    pool = await create_pool(settings.database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


async def new_course(pool) -> int:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"s-{uuid.uuid4().hex[:8]}")
        owner = await conn.fetchval(
            "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'o', 'instructor') RETURNING id", tid)
        return await conn.fetchval(
            "INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'search') RETURNING id", tid, owner)


async def ingest(pool, course_id: int, texts: list[str], video_id: int | None = None,  # type: ignore[no-untyped-def]
                 seed: int = 0) -> int:
    """Create (or re-ingest) a video with these chunk texts, as the ingest pipeline's final transaction does."""
    async with pool.acquire() as conn, conn.transaction():
        if video_id is None:
            video_id = (await videos_repo.create_video(conn, course_id, "v", "transcript"))["id"]
        await videos_repo.replace_chunks(conn, video_id, course_id, chunks_of(texts), unit_vectors(len(texts), seed),
                                         MODEL)
    return video_id


async def assert_stats_match_recount(conn, course_id: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    df = {(r["embed_model"], r["lexeme"]): r["df"] for r in await conn.fetch(
        "SELECT embed_model, lexeme, df FROM course_term_df WHERE course_id = $1", course_id)}
    recount = {(r["embed_model"], r["lexeme"]): r["n"] for r in await conn.fetch(
        "SELECT embed_model, lexeme, count(*) AS n FROM chunk_terms WHERE course_id = $1 GROUP BY 1, 2", course_id)}
    assert df == recount
    stats = {r["embed_model"]: (r["n_chunks"], r["total_terms"]) for r in await conn.fetch(
        "SELECT embed_model, n_chunks, total_terms FROM course_term_stats WHERE course_id = $1", course_id)}
    sizes = {r["embed_model"]: (r["n"], r["total"]) for r in await conn.fetch(
        """SELECT embed_model, count(*) AS n, sum(n_terms) AS total FROM chunks WHERE course_id = $1
           GROUP BY embed_model""", course_id)}
    assert stats == sizes
    return {lexeme: n for (_, lexeme), n in df.items()}


async def test_term_stats_follow_ingest_reingest_and_deletion(pool):
    cid = await new_course(pool)
    a = await ingest(pool, cid, ["Eigenvalues of a matrix", "The matrix times a vector", "Zebras graze"])
    b = await ingest(pool, cid, ["Another matrix lecture", "Photosynthesis in leaves"], seed=1)
    async with pool.acquire() as conn:
        df = await assert_stats_match_recount(conn, cid)
        assert df["matrix"] == 3 and df["zebra"] == 1 and df["photosynthesi"] == 1
    # re-ingest: the video's old chunks leave the statistics, the new ones enter
    await ingest(pool, cid, ["Matrix rank", "Matrix inverse and matrix rank", "Row reduction"], video_id=a, seed=2)
    async with pool.acquire() as conn:
        df = await assert_stats_match_recount(conn, cid)
        assert df["matrix"] == 3 and df["rank"] == 2 and "zebra" not in df and "eigenvalu" not in df
        cover = await search.vocabulary_coverage(conn, cid, MODEL, "zebras and matrix rank",
                                                 ["matrix", "eigenvalues", "zebras", "photosynthesis", "rank"])
        assert (cover.present, cover.missing) == (["matrix", "rank"], ["zebra"])
        # the words as spoken follow the video too (the tutor's judge reads them)
        assert cover.spoken == {"matrix", "photosynthesis", "rank"}
    # a video deleted the way the API does it
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM videos WHERE id = $1", b)
        await videos_repo.refresh_term_stats(conn, cid)
    async with pool.acquire() as conn:
        df = await assert_stats_match_recount(conn, cid)
        assert df["matrix"] == 2 and "photosynthesi" not in df and "lectur" not in df
        assert (await search.vocabulary_coverage(conn, cid, MODEL, "", ["photosynthesis", "inverse"])).spoken \
            == {"inverse"}
    # a video's title is the course's too: the tutor's follow-ups quote titles ("What does "Fibonacci Heaps III"
    # say about ...?"), and the judge declined them for words the speaker never says
    async with pool.acquire() as conn:
        await conn.execute("UPDATE videos SET title = 'Fibonacci Heaps III: Schrödinger’s Cat' WHERE id = $1", a)
        cover = await search.vocabulary_coverage(conn, cid, MODEL, "fibonacci heaps and zebras",
                                                 ["fibonacci", "iii", "schrodinger's", "zebras"])
        assert (cover.present, cover.missing) == (["fibonacci", "heap"], ["zebra"])
        assert cover.spoken == {"fibonacci", "iii", "schrodinger's"}


async def test_concurrent_ingests_of_one_course(pool):
    cid = await new_course(pool)
    words = "graph vertex edge path weight tree cycle matrix".split()
    texts = [[" ".join(words[(v + i) % len(words)] for i in range(j, j + 4)) for j in range(5)] for v in range(8)]
    vids = await asyncio.gather(*(ingest(pool, cid, t, seed=v) for v, t in enumerate(texts)))
    await asyncio.gather(*(ingest(pool, cid, list(reversed(t)), video_id=v) for v, t in zip(vids, texts)))
    async with pool.acquire() as conn:
        df = await assert_stats_match_recount(conn, cid)
    assert sum(df.values()) == 8 * 5 * 4


async def test_common_terms_still_score_the_candidates(pool, monkeypatch):
    """With a postings budget only the rarest term's postings are read; the commoner term is looked up for the
    candidates alone, and their scores are exact BM25."""
    cid = await new_course(pool)
    texts = ["zebra crossing", "a zebra on a graph of graphs", "zebra graph"] + \
            [f"graph number {i} with graph edges" for i in range(4)] + [f"lecture number {i}" for i in range(8)]
    vid = await ingest(pool, cid, texts)
    vec = unit_vectors(1, seed=9)[0]

    async def sparse_hits(budget: int, **kw) -> list[tuple[str, float]]:
        monkeypatch.setattr(search, "POSTINGS_BUDGET", budget)
        search._statement.cache_clear()
        async with pool.acquire() as conn:
            hits = await search.hybrid_search(conn, cid, vec, "zebra graphs", MODEL, k=20, w_sparse=1.0, **kw)
        return [(h.text, round(h.sparse_score, 9)) for h in hits if h.sparse_score is not None]

    try:
        exact = await sparse_hits(10**9)
        budgeted = await sparse_hits(3)  # df(zebra) = 3 fits, df(graph) = 6 does not
        in_video = await sparse_hits(3, video_id=vid)
    finally:
        search._statement.cache_clear()
    # exact BM25: the chunks holding both terms first, then the one holding only the rare term, then graph alone
    assert len(exact) == 7
    assert {t for t, _ in exact[:2]} == {"a zebra on a graph of graphs", "zebra graph"}
    assert exact[2][0] == "zebra crossing" and exact[3][0].startswith("graph number")
    # budgeted: the candidates come from the rare term alone, in the same order with the same scores
    assert budgeted == exact[:3] == in_video


async def test_full_text_search_folds_accents_both_ways(pool):
    """"schrodinger" finds the chunk that says "Schrödinger" and "Poincaré" the one that says "Poincare" (no
    unaccent extension in the embedded Postgres: migration 0022's sh_fold); the judge's coverage agrees."""
    cid = await new_course(pool)
    texts = ["Schrödinger’s equation describes the wave function", "Poincare conjectured it about spheres",
             "a naïve café serves coffee", "matrices and vectors", "graphs and trees",
             "Go\u0308del proved incompleteness"]  # stored decomposed: o and a combining diaeresis
    await ingest(pool, cid, texts)
    vec = unit_vectors(1, seed=11)[0]
    async with pool.acquire() as conn:
        for question, want in (("schrodinger's equation", 0), ("Schrödinger", 0), ("what did Poincaré conjecture", 1),
                               ("naive cafe", 2), ("NAÏVE CAFÉ", 2), ("godel", 5), ("Gödel", 5)):
            hits = await search.hybrid_search(conn, cid, vec, question, MODEL, k=5, w_sparse=1.0)
            scored = [h.text for h in hits if h.sparse_score]
            assert scored[:1] == [texts[want]], (question, scored)
        cover = await search.vocabulary_coverage(conn, cid, MODEL, "Schrödinger and Poincare on cafes")
        assert {"schroding", "poincar", "cafe"} <= set(cover.present) and cover.missing == []


async def test_full_text_search_reads_words_through_typographic_punctuation(pool):
    """Postgres (C locale) took every non-ASCII character for a letter: a chunk saying “eigenvalue” or lambda… was
    stored under the lexemes “eigenvalue” and lambda…, which no search for the word matched (migration 0034); the
    questions' side cut "हिन्दी" into pieces Postgres never makes."""
    cid = await new_course(pool)
    texts = ["The “eigenvalue” of A—that is, lambda… matters", "«Bayes» rule ¿qué? it\u200bsays",
             "हिन्दी भाषा में", "matrices and vectors", "graphs and trees"]
    await ingest(pool, cid, texts)
    vec = unit_vectors(1, seed=11)[0]
    async with pool.acquire() as conn:
        lexemes = {r["lexeme"] for r in await conn.fetch("SELECT lexeme FROM chunk_terms WHERE course_id = $1", cid)}
        assert {"eigenvalu", "lambda", "bay", "que", "itsay", "हिन्दी"} <= lexemes, lexemes
        assert not {x for x in lexemes if any(ch in x for ch in "“”—…«»¿")}, lexemes
        for question, want in (("eigenvalue", 0), ("what is lambda", 0), ("Bayes", 1), ("हिन्दी", 2)):
            hits = await search.hybrid_search(conn, cid, vec, question, MODEL, k=5, w_sparse=1.0)
            scored = [h.text for h in hits if h.sparse_score]
            assert scored[:1] == [texts[want]], (question, scored)
        # a search box's query: "mean" and "example" are what is looked for there
        await ingest(pool, cid, ["the arithmetic mean of an example set"])
        hits = await search.hybrid_search(conn, cid, vec, "mean example", MODEL, k=5, w_sparse=1.0, question=False)
        assert [h.text for h in hits if h.sparse_score][:1] == ["the arithmetic mean of an example set"]


async def test_full_text_search_lower_cases_every_script_and_drops_soft_hyphens(pool):
    """(Tester) under the C locale Postgres lower-cased ASCII only: "Митохондрии" was stored as it is and never
    matched the question's lower-cased word, even copied from the transcript (migration 0050's sh_lower); a soft
    hyphen (from a PDF) split nothing but made its word unfindable, in a chunk and in a question alike."""
    cid = await new_course(pool)
    texts = ["Митохондрии производят энергию для клетки.", "Рибосомы синтезируют белки.",
             "ΟΔΟΣ και ΣΟΦΙΑ", "ＭＩＴＯＳＩＳ divides cells", "The mito\u00adchondria produce energy",
             "matrices and vectors", "\U0001e900\U0001e923\U0001e924 Adlam", "Schrödinger’s ÉQUATION"]
    await ingest(pool, cid, texts)
    vec = unit_vectors(1, seed=11)[0]
    async with pool.acquire() as conn:
        for question, want in (("Митохондрии", 0), ("митохондрии", 0), ("РИБОСОМЫ", 1), ("рибосомы", 1),
                               ("οδος", 2), ("ΟΔΟΣ", 2), ("σοφια", 2), ("ｍｉｔｏｓｉｓ", 3), ("ＭＩＴＯＳＩＳ", 3),
                               ("mitochondria", 4), ("mito\u00adchondria energy", 4),
                               ("\U0001e900\U0001e923\U0001e924", 6), ("\U0001e922\U0001e923\U0001e924", 6),
                               ("équation", 7), ("schrodinger", 7)):
            hits = await search.hybrid_search(conn, cid, vec, question, MODEL, k=5, w_sparse=1.0)
            scored = [h.text for h in hits if h.sparse_score]
            assert scored[:1] == [texts[want]], (question, scored)
        lexemes = {r["lexeme"] for r in await conn.fetch("SELECT lexeme FROM chunk_terms WHERE course_id = $1", cid)}
        assert "митохондрии" in lexemes and "Митохондрии" not in lexemes, lexemes


async def test_small_course_is_ranked_exactly(pool):
    """A course that is a small part of the HNSW graph gets the exact cosine ranking, search after search."""
    cid = await new_course(pool)
    texts = [f"lecture {i} on graphs and matrices number {i}" for i in range(40)]
    await ingest(pool, cid, texts, seed=5)
    vecs, q = unit_vectors(40, seed=5), unit_vectors(3, seed=6)
    async with pool.acquire() as conn:
        for v in [*q, *q]:
            hits = await search.hybrid_search(conn, cid, v, "graphs", MODEL, k=5, w_sparse=0.0)
            assert [h.text for h in hits] == [texts[i] for i in np.argsort(-(vecs @ v))[:5]]


async def test_ensemble_hits_carry_their_primary_members_cosine(pool):
    """An ensemble's 768-wide vectors (two unit halves scaled by sqrt(weight)): the fused ranking uses the whole
    vector, and each hit also carries the first half's own cosine (the judge's scale), for the exact ranking, one
    video, and the HNSW walk alike."""
    w = 0.18
    cid = await new_course(pool)
    texts = [f"lecture {i} on graphs and matrices number {i}" for i in range(30)]
    halves = unit_vectors(30, seed=8), unit_vectors(30, seed=9)
    vecs = np.hstack([np.sqrt(w) * halves[0], np.sqrt(1 - w) * halves[1]]).astype(np.float32)
    async with pool.acquire() as conn, conn.transaction():
        vid = (await videos_repo.create_video(conn, cid, "v", "transcript"))["id"]
        await videos_repo.replace_chunks(conn, vid, cid, chunks_of(texts), vecs, "ensemble@1")
    qh = unit_vectors(2, seed=10)
    q = np.hstack([np.sqrt(w) * qh[0], np.sqrt(1 - w) * qh[1]]).astype(np.float32)
    async with pool.acquire() as conn:
        for kw in ({}, {"video_id": vid}, {"candidates": 50}):
            hits = await search.hybrid_search(conn, cid, q, "graphs", "ensemble@1", k=5, w_sparse=0.0,
                                              primary=(384, w), **kw)
            assert [h.text for h in hits] == [texts[i] for i in np.argsort(-(vecs @ q))[:5]]
            for h in hits:
                i = texts.index(h.text)
                assert h.dense_score == pytest.approx(float(vecs[i] @ q), abs=1e-5)
                assert h.primary_dense == pytest.approx(float(halves[0][i] @ qh[0]), abs=1e-5)
        search._course_sizes[(cid, "ensemble@1")] = search.EXACT_COURSE_MAX + 1  # as a big course: the graph
        try:
            hits = await search.hybrid_search(conn, cid, q, "graphs", "ensemble@1", k=3, w_sparse=0.0,
                                              primary=(384, w))
        finally:
            search._course_sizes.pop((cid, "ensemble@1"), None)
        assert hits and all(h.primary_dense == pytest.approx(float(halves[0][texts.index(h.text)] @ qh[0]), abs=1e-5)
                            for h in hits)
        plain = await search.hybrid_search(conn, cid, q, "graphs", "ensemble@1", k=3, w_sparse=0.0)
        assert all(h.primary_dense is None for h in plain)
        # a hit only BM25 found has no dense cosine, and no primary one either (the judge counts it as 0)
        mixed = await search.hybrid_search(conn, cid, q, "graphs number 7", "ensemble@1", k=8, w_sparse=0.5,
                                           candidates=3, primary=(384, w))
        sparse_only = [h for h in mixed if h.dense_score is None]
        assert sparse_only and all(h.primary_dense is None for h in sparse_only)
        assert all(h.primary_dense is not None for h in mixed if h.dense_score is not None)


async def test_spoken_words_tokenize_like_the_migration(pool):
    """Ingest (Python) and migration 0008's backfill (SQL, its very text) must cut words the same way."""
    text = ("GPT-2’s heads vs. GPT-3; Hamilton's rule -- e.g. x=0, 3-by-3 matrices, rock'n'roll, 'quoted' ... MatLab "
            "Schrödinger, GÖDEL, Poincaré’s naïve café")
    migration = (Path(__file__).resolve().parents[2] / "store/migrations/0008_video_words.sql").read_text()
    tokenize = migration[migration.index("regexp_matches("):migration.index("AS m")].replace("c.text", "$1::text")
    sql = await pool.fetch(f"SELECT DISTINCT m[1] AS w FROM {tokenize} AS m", text)
    assert {r["w"] for r in sql} == videos_repo.spoken_words([text])
    assert {"gpt-2's", "hamilton's", "3-by-3", "rock'n'roll", "quoted", "schrodinger", "godel", "poincare's",
            "naive", "cafe"} <= videos_repo.spoken_words([text])


def test_keyword_text_keeps_words_in_any_script():
    """The full-text side got "schr dinger caf" for "Schrödinger café": no BM25 match for accented words, and the
    tutor's judge heard them as missing from the course."""
    assert search.keyword_text("What did Schrödinger say in the café?") == "schrödinger in the café"
    assert search.keyword_text("Why is naïve Bayes naïve?") == "is naïve bayes naïve"
    # a decomposed accent (NFD, as some keyboards and macOS send it) is the same word, not "go" and "del"
    assert search.keyword_text(unicodedata.normalize("NFD", "What did Gödel prove?")) == "gödel prove"
    # a word with vowel signs (combining marks) is one word, as Postgres reads it, not "ह न द"
    assert search.keyword_text("हिन्दी भाषा") == "हिन्दी भाषा"
    # typographic punctuation ends words; what Postgres reads as one word stays one
    assert search.keyword_text("what's the “eigenvalue”—really… «Bayes»") == "what's the eigenvalue really bayes"
    assert search.keyword_text("3.14, k-means and it's") == "3.14 k-means and it's"
    # invisible marks go, as sh_fold drops them; a zero-width non-joiner is spelling (Persian): kept
    assert search.keyword_text("wo\u2060rd \u200eleft\u200f") == "word left"
    assert search.keyword_text("می\u200cخواهم") == "می\u200cخواهم"
    # a search box's query keeps the words a question would not need ("mean", "example", "video")
    assert search.keyword_text("video compression example") == "compression"
    assert search.keyword_text("video compression example", question_words=False) == "video compression example"



async def test_a_small_course_never_walks_the_graph(pool, monkeypatch):
    """The same lecture in many courses puts near copies of every chunk in the one HNSW graph, and a course-filtered
    walk over it loses recall without coming back short: with 17 copies of the eval course in the bench database,
    the walk returned 50 of the course's chunks but not its nearest, and the tutor cited the wrong lecture (hit@3
    0.917 -> 0.883). A course of at most EXACT_COURSE_MAX chunks is ranked exactly from its first search on; a
    larger one walks the graph."""
    walked: list[bool] = []
    real = search._statement

    def statement(candidates: int, k: int, *, exact: bool, video: bool, **kw) -> str:  # type: ignore[no-untyped-def]
        walked.append(not exact)
        return real(candidates, k, exact=exact, video=video, **kw)

    monkeypatch.setattr(search, "_statement", statement)
    cid = await new_course(pool)
    texts = [f"lecture {i} on graphs and matrices number {i}" for i in range(60)]
    await ingest(pool, cid, texts, seed=7)
    vecs = unit_vectors(60, seed=7)
    for memo in ("_course_sizes", "_exact_courses"):  # a process that has not searched this course yet
        getattr(search, memo, {}).clear()
    async with pool.acquire() as conn:
        for v in unit_vectors(3, seed=8):
            hits = await search.hybrid_search(conn, cid, v, "graphs", MODEL, k=5, w_sparse=0.0)
            assert [h.text for h in hits] == [texts[i] for i in np.argsort(-(vecs @ v))[:5]]
        assert walked == [False, False, False]
        monkeypatch.setattr(search, "EXACT_COURSE_MAX", 10)  # past the limit: the graph first
        await search.hybrid_search(conn, cid, vecs[0], "graphs", MODEL, k=5)
        assert walked[-1] is True or walked[-2:] == [True, False]


async def test_a_course_fresh_from_ingest_is_searched_by_index_lookups(pool):
    """Right after ingest the planner's statistics do not know the course: it took it for a row or two and
    planned the BM25 side as a scan of the course's postings, recomputing the question's lexemes for each row
    (0.3-0.6 s a search, until an ANALYZE). The lexemes are computed once and each term is one index lookup."""
    cid = await new_course(pool)
    await ingest(pool, cid, [f"graphs and matrices lecture {i} on eigenvalues" for i in range(80)], seed=9)
    async with pool.acquire() as conn:
        for exact in (True, False):
            plan = [r[0] for r in await conn.fetch(
                "EXPLAIN " + search._statement(50, 8, exact=exact, video=False), unit_vectors(1, seed=9)[0], cid,
                MODEL, "eigenvalues of graphs", 0.3)]
            assert not any("to_tsvector" in line and "Filter:" in line for line in plan), "\n".join(plan)
            assert not any("Join Filter: (chunk_terms" in line for line in plan), "\n".join(plan)
