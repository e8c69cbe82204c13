"""Tutor overhead on the 89-hour corpus: everything but the model (condense, retrieve, judge, cite, persist,
fan out), beside retrieval alone, in the same run. Query embedding time is measured and subtracted.

Reuses the corpus course `bench.ingest` built in .bench/ingest. `python -m bench.tutor_overhead [--queries 200]`
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from redis.asyncio import Redis

from agents.config import embedder_for
from agents.tutor import Tutor
from bench.common import pct, services
from store import tutor as tutor_repo
from store.db import create_pool
from store.messages import post_message
from store.search import hybrid_search


class TimedEmbedder:
    """Wraps the embedder and adds up the time spent in it (the model's share)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.name, self.dim, self.spent = inner, inner.name, inner.dim, 0.0

    def embed(self, texts):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return self.inner.embed(texts)
        finally:
            self.spent += time.perf_counter() - t



async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    settings, svc = await services("ingest")
    try:
        pool = await create_pool(settings.database_url)
        redis = Redis.from_url(settings.redis_url)
        row = await pool.fetchrow("""SELECT c.id, c.owner_id, count(k.*) AS n FROM courses c
                                     JOIN chunks k ON k.course_id = c.id GROUP BY c.id ORDER BY n DESC LIMIT 1""")
        if row is None:
            raise SystemExit("run `python -m bench.ingest` first: it builds the corpus course")
        cid, owner = row["id"], row["owner_id"]
        room = f"course:{cid}"
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO rooms (id, kind, course_id) VALUES ($1, 'course', $2) ON CONFLICT DO NOTHING",
                               room, cid)
        emb = TimedEmbedder(embedder_for(settings))
        tutor = Tutor(pool, emb, None)
        texts = [r["text"] for r in await pool.fetch("SELECT text FROM chunks WHERE course_id = $1 LIMIT 3000", cid)]
        rng = random.Random(3)
        queries = []
        for _ in range(args.queries):
            words = rng.choice(texts).split()
            i = rng.randrange(max(1, len(words) - 10))
            queries.append("What does the lecture say about " + " ".join(words[i: i + rng.randint(4, 9)]) + "?")
        overhead, retrieval = [], []
        for q in queries:
            before = emb.spent
            t0 = time.perf_counter()
            out = await tutor.run(cid, q)
            async with pool.acquire() as conn:
                turn = await tutor_repo.record_turn(conn, course_id=cid, user_id=owner, question=q, standalone=q,
                                                    answer=out["answer"], grounded=out["grounded"],
                                                    citations=out.get("citations") or [],
                                                    follow_ups=out.get("follow_ups") or [], provider="extractive",
                                                    model="extractive")
            await post_message(pool, redis, room, None, out["answer"], {"turn_id": turn["id"]},
                               author_name="Tutor", author_role="tutor")
            overhead.append((time.perf_counter() - t0 - (emb.spent - before)) * 1000)
            vec = emb.embed([q])[0]
            t1 = time.perf_counter()
            async with pool.acquire() as conn:
                await hybrid_search(conn, cid, vec, q, emb.name, k=8)
            retrieval.append((time.perf_counter() - t1) * 1000)
        await redis.aclose()
        await pool.close()
    finally:
        svc.close()
    print(f"{len(queries)} questions on {row['n']} chunks")
    print(f"tutor overhead (no model time): p50 {statistics.median(overhead):.1f} ms, p95 {pct(overhead, 95):.1f} ms "
          "(target p95 < 100 ms)")
    print(f"retrieval only: p50 {statistics.median(retrieval):.1f} ms, p95 {pct(retrieval, 95):.1f} ms")
    print(f"query embedding (the model's share), total {emb.spent:.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
