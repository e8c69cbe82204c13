"""Hybrid search latency over the corpus, beside a bare pgvector top-k query in the same run.

Targets: hybrid p95 <= 25 ms, and p95 ratio to bare pgvector <= 2. Reuses the course `bench.ingest` built
(in .bench/ingest); builds one from the first --lectures lectures when there is none.
`python -m bench.search [--queries 300]`
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from agents.config import embedder_for
from bench.common import EVAL, eval_spec, pct, services
from bench.ingest import ingest_corpus
from store.db import create_pool
from store.search import dense_search, hybrid_search



async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--lectures", type=int, default=99)
    args = ap.parse_args()
    settings, svc = await services("ingest")
    try:
        pool = await create_pool(settings.database_url)
        emb = embedder_for(settings)
        row = await pool.fetchrow("""SELECT c.id, count(k.*) AS n FROM courses c JOIN chunks k ON k.course_id = c.id
                                     WHERE c.title = 'corpus' AND k.embed_model = $1
                                     GROUP BY c.id ORDER BY n DESC LIMIT 1""", emb.name)
        if row is None:
            files = sorted((EVAL / "corpus").glob("*.vtt"))[: args.lectures]
            cid, _, n = await ingest_corpus(settings, files)
        else:
            cid, n = row["id"], row["n"]
        rng = random.Random(7)
        texts = [r["text"] for r in await pool.fetch("SELECT text FROM chunks WHERE course_id = $1", cid)]
        queries = [q["question"] for q in eval_spec()["questions"]]
        while len(queries) < args.queries:
            words = rng.choice(texts).split()
            i = rng.randrange(max(1, len(words) - 12))
            queries.append(" ".join(words[i: i + rng.randint(5, 12)]))
        t0 = time.perf_counter()
        vecs = [emb.embed_query(q) for q in queries]
        embed_ms = (time.perf_counter() - t0) * 1000 / len(queries)
        hybrid, bare = [], []
        async with pool.acquire() as conn:
            # warm caches and plans: after five executions Postgres settles on a statement's generic plan, as it
            # has on a server's pooled connections
            for q, v in list(zip(queries, vecs))[:8]:
                await hybrid_search(conn, cid, v, q, emb.name, k=5)
                await dense_search(conn, cid, v, emb.name, k=5)
            for q, v in zip(queries, vecs):
                t = time.perf_counter()
                await dense_search(conn, cid, v, emb.name, k=5)
                bare.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                await hybrid_search(conn, cid, v, q, emb.name, k=5)
                hybrid.append((time.perf_counter() - t) * 1000)
        await pool.close()
    finally:
        svc.close()
    print(f"corpus course: {n} chunks; {len(queries)} queries; query embedding {embed_ms:.1f} ms each")
    print(f"hybrid search: p50 {statistics.median(hybrid):.2f} ms, p95 {pct(hybrid, 95):.2f} ms (target <= 25 ms)")
    print(f"bare pgvector top-k: p50 {statistics.median(bare):.2f} ms, p95 {pct(bare, 95):.2f} ms")
    print(f"ratio hybrid/bare at p95: {pct(hybrid, 95) / pct(bare, 95):.2f} (target <= 2)")


if __name__ == "__main__":
    asyncio.run(main())
