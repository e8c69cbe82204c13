"""Tutor overhead on the 89-hour corpus: everything but the model (quota, history, cache lookup, condense,
retrieve, judge, cite, persist, fan out: the server's path for a room question, `server.tutoring.answer_in_room`),
beside retrieval alone, in the same run. Query embedding time is measured and subtracted.

Reuses the corpus course `bench.ingest` built in .bench/ingest. `python -m bench.tutor_overhead [--queries 200]`
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import replace
from types import SimpleNamespace

from redis.asyncio import Redis

from agents.config import embedder_for
from agents.tutor import Tutor
from bench.common import pct, services
from server.tutoring import RoomQuestion, answer_in_room
from store.db import create_pool
from store.messages import post_message
from store.search import hybrid_search


class TimedEmbedder:
    """Wraps the embedder and adds up the time spent in it (the model's share)."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.name, self.dim, self.spent = inner, inner.name, inner.dim, 0.0
        self.primary_slice = getattr(inner, "primary_slice", None)  # an ensemble's: the judge's scale

    def _timed(self, fn, arg):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.spent += time.perf_counter() - t

    def embed(self, texts):  # type: ignore[no-untyped-def]
        return self._timed(self.inner.embed, texts)

    def embed_query(self, text):  # type: ignore[no-untyped-def]
        return self._timed(self.inner.embed_query, text)



async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    settings, svc = await services("ingest")
    try:
        pool = await create_pool(settings.database_url)
        redis = Redis.from_url(settings.redis_url)
        model = embedder_for(settings).name  # the course embedded by the configured model (not an old run's)
        row = await pool.fetchrow("""SELECT c.id, c.owner_id, count(k.*) AS n FROM courses c
                                     JOIN chunks k ON k.course_id = c.id WHERE k.embed_model = $1
                                     GROUP BY c.id ORDER BY n DESC LIMIT 1""", model)
        if row is None:
            raise SystemExit("run `python -m bench.ingest` first: it builds the corpus course")
        cid = row["id"]
        room = f"course:{cid}"
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO rooms (id, kind, course_id) VALUES ($1, 'course', $2) ON CONFLICT DO NOTHING",
                               room, cid)
            learner = await conn.fetchval(
                """INSERT INTO users (tenant_id, name, role) SELECT tenant_id, 'bench learner', 'learner' FROM courses
                   WHERE id = $1 ON CONFLICT (tenant_id, name) DO UPDATE SET role = 'learner' RETURNING id""", cid)
            # enrolled: a post is refused to someone who may not use the room
            await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                               cid, learner)
        emb = TimedEmbedder(embedder_for(settings))
        # the server's own path for a room question: quota, history, cache, the graph, the stored turn, the
        # posted reply, the answer's hold (a limit no run reaches, so the quota statement runs but never refuses)
        state = SimpleNamespace(settings=replace(settings, tutor_daily_limit=10**9), pool=pool, redis=redis,
                                tutor=Tutor(pool, emb, None), hub=SimpleNamespace(proc="bench-tutor-overhead"))
        user = SimpleNamespace(id=learner, role="learner", name="bench learner")
        texts = [r["text"] for r in await pool.fetch("SELECT text FROM chunks WHERE course_id = $1 LIMIT 3000", cid)]
        rng = random.Random(3)
        queries = []
        for _ in range(args.queries):
            words = rng.choice(texts).split()
            i = rng.randrange(max(1, len(words) - 10))
            queries.append("What does the lecture say about " + " ".join(words[i: i + rng.randint(4, 9)]) + "?")
        overhead, retrieval, failed = [], [], 0
        for q in queries:
            hold = RoomQuestion(state.hub.proc, learner, cid, room)  # the answer's hold, as the server keeps it
            asked = await post_message(pool, redis, room, learner, q, also=hold)
            before = emb.spent
            t0 = time.perf_counter()
            await answer_in_room(state, user, cid, room, asked.event.id, q, hold.pending)
            overhead.append((time.perf_counter() - t0 - (emb.spent - before)) * 1000)
            # a failed answer is fast and posts a reply all the same: count it (its timing is no overhead figure)
            reply = await pool.fetchval("SELECT meta FROM messages WHERE room_id = $1 AND client_msg_id = $2",
                                        room, f"tutor:{asked.event.id}")
            if reply is None or reply.get("turn_id") is None:
                failed += 1
            vec = emb.embed_query(q)
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
    if failed:
        raise SystemExit(f"{failed} of {len(queries)} questions failed (see the log above): the figures are not valid")


if __name__ == "__main__":
    asyncio.run(main())
