"""The tutor's check of learners' replies (agents/helpful.py) on ../shared/eval: how often it marks helpful
a right answer, and how often a wrong one, beside a baseline in the same run (similarity alone: a reply as close
as MIN_COS to one of the moments the tutor found for the question counts as helpful).

For each eval question the replies are: its reference answer (right); the same with a "not" put in (its claim
turned around, as a learner who half remembers might write); the reference answer of another question
about the same video (wrong, on the same topic: the hard case); one about another video (wrong, off topic); the
question restated; and a reply that only points at the video. A mark on a wrong reply gives XP for it, so the
figure to watch is the wrong replies' rate. Then, as a check on a set the thresholds were not chosen on, casual
replies a black-box tester wrote to the same questions, right and wrong; and a second tester's subtly wrong replies
(negated, a number changed, an opposite swapped, yes/no flipped), on which the `contradicts` rules were refined.
`python -m bench.helpful_eval` (offline: no model is called).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import defaultdict

from agents import helpful
from agents.embedder import local_default
from agents.grader import embed_cached
from agents.tutor import Tutor
from bench.common import ROOT, eval_spec, services
from bench.search_quality import build
from store.db import create_pool

KINDS = ("right", "negated", "same video", "other video", "restated", "points at the video")
_AUX = re.compile(r"\b(is|are|was|were|can|does|do|has|have|will|would|should|must)\b", re.I)
CASUAL = ROOT / "bench" / "data" / "casual_replies.json"
SUBTLY_WRONG = ROOT / "bench" / "data" / "subtly_wrong_replies.json"
_SUBTLE = {"neg_ref": "reference answer, negated", "num_ref": "reference answer, a number changed",
           "opp_ref": "reference answer, an opposite swapped", "yesno_ref": "reference answer, yes/no flipped",
           "neg_c": "casual answer, negated", "num_c": "casual answer, a number changed",
           "opp_c": "casual answer, an opposite swapped"}
POINTING = "I think they explain it somewhere in the video, just rewatch that part"


def replies(spec: dict, rnd: random.Random) -> list[tuple[dict, str, str]]:
    qs = spec["questions"]
    out = []
    for q in qs:
        same = [o for o in qs if o["file"] == q["file"] and o is not q]
        other = [o for o in qs if o["file"] != q["file"]]
        negated = (_AUX.sub(lambda m: m.group(0) + " not", q["answer"], count=1) if _AUX.search(q["answer"])
                   else "It is not true that " + q["answer"][0].lower() + q["answer"][1:])
        out += [(q, "right", q["answer"]), (q, "negated", negated), (q, "same video", rnd.choice(same)["answer"]),
                (q, "other video", rnd.choice(other)["answer"]),
                (q, "restated", q["question"].rstrip(" ?") + "."), (q, "points at the video", POINTING)]
    return out


async def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # (--help prints, not runs)
    eval_spec()  # the eval data is there, before anything starts
    settings, svc = await services("helpful_eval")
    try:
        pool = await create_pool(settings.database_url)
        spec, embedder = eval_spec(), local_default()
        cid, _ = await build(pool, spec, embedder, target_tokens=120)
        tutor = Tutor(pool, embedder, None)
        marked: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        baseline: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        sources: dict[str, list[str]] = {}
        ms = []
        for q, kind, reply in replies(spec, random.Random(3)):
            t0 = time.perf_counter()
            check = await helpful.check_reply(tutor, embedder, None, cid, q["question"], reply)
            ms.append((time.perf_counter() - t0) * 1000)
            marked[kind][0] += check.helpful
            marked[kind][1] += 1
            if q["id"] not in sources:  # the baseline compares with the same moments the check does
                s: dict = {"course_id": cid, "question": q["question"], "history": [], "standalone": q["question"]}
                s.update(await tutor.retrieve(s))
                s.update(await tutor.judge(s))
                sources[q["id"]] = [w.text for w in s["sources"][:helpful.SOURCES]] if s["grounded"] else []
            refs = sources[q["id"]]
            vec = embed_cached(embedder, [reply, *refs])
            baseline[kind][0] += bool(refs) and max(float(vec[reply] @ vec[r]) for r in refs) >= helpful.MIN_COS
            baseline[kind][1] += 1
        casual: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # the check, the baseline, n
        by_id = {q["id"]: q for q in spec["questions"]}
        for r in json.loads(CASUAL.read_text()):
            q = by_id[r["qid"]]
            check = await helpful.check_reply(tutor, embedder, None, cid, q["question"], r["text"])
            refs = sources[q["id"]]
            vec = embed_cached(embedder, [r["text"], *refs])
            near = bool(refs) and max(float(vec[r["text"]] @ vec[x]) for x in refs) >= helpful.MIN_COS
            casual[r["kind"]][0] += check.helpful
            casual[r["kind"]][1] += near
            casual[r["kind"]][2] += 1
        wrongish: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in json.loads(SUBTLY_WRONG.read_text()):
            check = await helpful.check_reply(tutor, embedder, None, cid, by_id[r["qid"]]["question"], r["text"])
            wrongish[r["kind"]][0] += check.helpful
            wrongish[r["kind"]][1] += 1
        await pool.close()
    finally:
        svc.close()
    print(f"replies marked helpful, of {marked['right'][1]} per kind (the check / similarity alone >= "
          f"{helpful.MIN_COS}):")
    for kind in KINDS:
        (a, n), (b, _) = marked[kind], baseline[kind]
        print(f"  {kind:<22} {a / n:6.1%}   baseline {b / n:6.1%}")
    wrong = sum(marked[k][0] for k in KINDS[1:])
    wrong_b = sum(baseline[k][0] for k in KINDS[1:])
    prec = marked["right"][0] / max(1, marked["right"][0] + wrong)
    prec_b = baseline["right"][0] / max(1, baseline["right"][0] + wrong_b)
    print(f"precision over all replies: {prec:.3f} (baseline {prec_b:.3f}); wrong replies marked: {wrong} "
          f"(baseline {wrong_b}), ratio {wrong / max(1, wrong_b):.2f}")
    print("casual replies a tester wrote (bench/data/casual_replies.json; not used to choose the thresholds):")
    for kind in ("right", "wrong"):
        a, b, n = casual[kind]
        print(f"  {kind:<22} {a / n:6.1%}   baseline {b / n:6.1%}   (of {n})")
    print("subtly wrong replies a second tester wrote (bench/data/subtly_wrong_replies.json; `contradicts` was refined "
          "on them: not held out):")
    for kind, (a, n) in sorted(wrongish.items()):
        print(f"  {_SUBTLE.get(kind, kind):<40} {a / n:6.1%}   (of {n})")
    ms.sort()
    print(f"one check (retrieve, judge, score): p50 {ms[len(ms) // 2]:.1f} ms, "
          f"p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
