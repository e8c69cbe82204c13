"""Retrieval quality on ../shared/eval: hit@1/3/5 of dense, full-text and hybrid search over the real
chunks in Postgres, with the shipped chunking and fusion weight unless told otherwise.
`python -m bench.search_quality [--w-sparse W ...] [--target TOKENS ...]`"""
from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from agents.embedder import local_default, primary_part
from bench.common import EVAL, eval_spec, make_course, services
from ingest.chapters import build_chapters
from ingest.chunking import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP_SENTENCES, chunk_sentences, to_sentences
from ingest.pipeline import CHUNK_TARGET_TOKENS
from ingest.transcripts import parse_transcript
from store import videos as videos_repo
from store.db import create_pool
from store.search import SPARSE_WEIGHT, hybrid_search


def cached_embed(embedder, texts):  # type: ignore[no-untyped-def]
    """Embeddings cached on disk by content, so tuning runs do not pay for the same vectors twice."""
    import hashlib

    from bench.common import ROOT

    key = hashlib.sha256((embedder.name + "\x00".join(texts)).encode()).hexdigest()[:16]
    path = ROOT / ".bench" / "emb-cache" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    emb = embedder.embed(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def overlaps(start: float, end: float, spans: list) -> bool:
    return any(start <= b and end >= a for a, b in spans)


async def build(pool, spec, embedder, **chunk_kw):  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        cid = await make_course(conn, "search-quality")
    vids = {}
    for v in spec["videos"]:
        cues = parse_transcript((EVAL / "transcripts" / v["file"]).read_bytes(), v["file"])
        chunks = chunk_sentences(to_sentences(cues), **chunk_kw)
        emb = cached_embed(embedder, [c.text for c in chunks])
        async with pool.acquire() as conn, conn.transaction():
            video = await videos_repo.create_video(conn, cid, v["title"], "transcript", filename=v["file"])
            await videos_repo.replace_chunks(conn, video["id"], cid, chunks, emb, embedder.name)
            await videos_repo.replace_chapters(conn, video["id"], build_chapters(chunks, primary_part(embedder, emb)))
        vids[v["file"]] = video["id"]
    return cid, vids


async def evaluate(pool, cid, vids, spec, embedder, *, w_sparse: float, k_list=(1, 3, 5)) -> dict:  # type: ignore[no-untyped-def]
    res = {name: {k: 0 for k in k_list} for name in ("dense", "sparse", "hybrid")}
    misses = []
    qs = spec["questions"]
    qvecs = [embedder.embed_query(q["question"]) for q in qs]
    async with pool.acquire() as conn:
        for q, vec in zip(qs, qvecs):
            vid = vids[q["file"]]
            for name, ws in {"dense": 0.0, "sparse": 1.0, "hybrid": w_sparse}.items():
                hits = await hybrid_search(conn, cid, vec, q["question"], embedder.name, k=max(k_list), w_sparse=ws)
                if name == "sparse":
                    hits = [h for h in hits if h.sparse_score is not None]
                for k in k_list:
                    if any(h.video_id == vid and overlaps(h.start, h.end, q["spans"]) for h in hits[:k]):
                        res[name][k] += 1
                if name == "hybrid" and not any(h.video_id == vid and overlaps(h.start, h.end, q["spans"])
                                                for h in hits[:5]):
                    misses.append(q["id"])
    n = len(qs)
    return {name: {k: round(v / n, 3) for k, v in d.items()} for name, d in res.items()} | {"misses": misses}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--w-sparse", type=float, nargs="*", default=[SPARSE_WEIGHT])
    ap.add_argument("--target", type=int, nargs="*", default=[CHUNK_TARGET_TOKENS])
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    ap.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP_SENTENCES)
    args = ap.parse_args()
    settings, svc = await services("search_quality")
    try:
        pool = await create_pool(settings.database_url)
        spec = eval_spec()
        embedder = local_default()
        for target in args.target:
            t0 = time.perf_counter()
            cid, vids = await build(pool, spec, embedder, target_tokens=target,
                                    max_tokens=max(args.max_tokens, target), overlap_sentences=args.overlap)
            n = await pool.fetchval("SELECT count(*) FROM chunks WHERE course_id = $1", cid)
            print(f"target={target} chunks={n} built in {time.perf_counter() - t0:.1f}s")
            for w in args.w_sparse:
                r = await evaluate(pool, cid, vids, spec, embedder, w_sparse=w)
                print(f"  w_sparse={w}: dense {r['dense']}  sparse {r['sparse']}  hybrid {r['hybrid']}  "
                      f"misses {r['misses']}")
        await pool.close()
    finally:
        svc.close()


if __name__ == "__main__":
    asyncio.run(main())
