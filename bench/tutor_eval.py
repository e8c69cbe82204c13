"""Tutor quality on ../shared/eval: citation hit@1/hit@3 by question kind, refusals, and two baselines
(BM25 only with rank-bm25, dense only) over the same chunks, in the same run; plus the tutor's overhead.

`python -m bench.tutor_eval` (offline defaults: extractive answers, local embedder).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict

import numpy as np
from rank_bm25 import BM25Okapi

from agents.embedder import local_default
from agents.evidence import terms
from agents.tutor import Tutor
from bench.common import eval_spec, services
from bench.search_quality import build, overlaps
from store.db import create_pool
from store.vectors import stored


async def evaluate(pool, cid: int, vids: dict, spec: dict, embedder) -> dict:  # type: ignore[no-untyped-def]
    """Run every eval question through the tutor graph; returns metrics and per-question timings."""
    tutor = Tutor(pool, embedder, None)
    kinds: dict = defaultdict(lambda: [0, 0, 0])  # hit@1, hit@3, n
    long_cites, overhead, answered_oos, false_refusals = 0, [], 0, 0
    for q in spec["questions"]:
        t0 = time.perf_counter()
        out = await tutor.run(cid, q["question"])
        overhead.append((time.perf_counter() - t0) * 1000)
        cites = out.get("citations") or []
        vid = vids[q["file"]]
        ok = [c["video_id"] == vid and overlaps(c["start"], c["end"], q["spans"]) for c in cites]
        for key in (q["kind"], "all"):
            kinds[key][0] += any(ok[:1])
            kinds[key][1] += any(ok[:3])
            kinds[key][2] += 1
        long_cites += sum(1 for c in cites if c["end"] - c["start"] > 60)
        false_refusals += not out.get("grounded")
    for q in spec["out_of_scope"]:
        out = await tutor.run(cid, q["question"])
        answered_oos += bool(out.get("grounded") or out.get("citations"))
    n_in, n_oos = len(spec["questions"]), len(spec["out_of_scope"])
    return {"kinds": {k: (v[0] / v[2], v[1] / v[2], v[2]) for k, v in kinds.items()},
            "refusal_accuracy": (n_oos - answered_oos) / n_oos, "false_refusals": false_refusals / n_in,
            "long_citations": long_cites, "overhead_ms": overhead}


async def baselines(pool, cid: int, vids: dict, spec: dict, embedder) -> dict:  # type: ignore[no-untyped-def]
    """Chunk-level hit@k of BM25 alone (rank-bm25) and dense alone (exact cosine) over the same chunks."""
    rows = await pool.fetch("SELECT video_id, start_s, end_s, text, embedding FROM chunks WHERE course_id = $1 "
                            "ORDER BY id", cid)
    bm25 = BM25Okapi([terms(r["text"]) or ["_"] for r in rows])
    mat = np.vstack([r["embedding"].to_numpy().astype(np.float32) for r in rows])
    out = {"bm25": [0, 0], "dense": [0, 0]}
    qs = spec["questions"]
    qv = [embedder.embed_query(q["question"]) for q in qs]
    for q, v in zip(qs, qv):
        vid = vids[q["file"]]
        for name, scores in (("bm25", bm25.get_scores(terms(q["question"]))), ("dense", mat @ stored(v))):
            top = np.argsort(-np.asarray(scores))[:3]
            ok = [rows[i]["video_id"] == vid and overlaps(rows[i]["start_s"], rows[i]["end_s"], q["spans"])
                  for i in top]
            out[name][0] += any(ok[:1])
            out[name][1] += any(ok[:3])
    return {k: (v[0] / len(qs), v[1] / len(qs)) for k, v in out.items()}


async def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # (--help prints, not runs)
    eval_spec()  # the eval data is there, before anything starts
    settings, svc = await services("tutor_eval")
    try:
        pool = await create_pool(settings.database_url)
        spec, embedder = eval_spec(), local_default()
        cid, vids = await build(pool, spec, embedder, target_tokens=120)
        base = await baselines(pool, cid, vids, spec, embedder)
        res = await evaluate(pool, cid, vids, spec, embedder)
        await pool.close()
    finally:
        svc.close()
    print("citation hit@1 / hit@3 (a citation overlapping a gold span of the right video):")
    for kind, (h1, h3, n) in sorted(res["kinds"].items()):
        print(f"  {kind:<10} n={n:<3} hit@1 {h1:.3f}  hit@3 {h3:.3f}")
    for name, (h1, h3) in base.items():
        print(f"  baseline {name:<6} (whole chunks)  hit@1 {h1:.3f}  hit@3 {h3:.3f}")
    print(f"citations longer than 60 s: {res['long_citations']}")
    print(f"refusal accuracy on out_of_scope: {res['refusal_accuracy']:.3f}; "
          f"false refusals on answerable: {res['false_refusals']:.3f}")
    o = sorted(res["overhead_ms"])
    print(f"tutor run (condense, embed query, retrieve, judge, extractive answer, cite): "
          f"p50 {statistics.median(o):.1f} ms, p95 {o[int(0.95 * (len(o) - 1))]:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
