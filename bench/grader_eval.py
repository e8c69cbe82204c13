"""Agreement of the grader with human scores on ../shared/eval/grading (SemEval-2013 2-way, Mohler).

    .venv/bin/python -m bench.grader_eval            # offline grader vs baselines (and the LLM grader when
                                                     # OPENAI_API_KEY / ANTHROPIC_API_KEY is set: --llm-sample N)
    .venv/bin/python -m bench.grader_eval --fit      # refit agents/scoring.py's COLD/WARM weights (training only)

Figures, all on held-out data:
- SciEntsBank and Beetle unseen-answers: accuracy and macro-F1; the share of grades released without review
  (confidence >= STUDYHALL_REVIEW_THRESHOLD and outside the uncertain band) and how often a released grade
  agrees with the human label. "reference only" scores against the reference answer alone (a new
  assignment); "with exemplars" also uses the question's training answers as the instructor-graded
  exemplars an assignment accumulates in the review queue.
- Mohler (0-5): Pearson r and RMSE against the graders' mean, beside human-human (score_me vs score_other).
  Mohler has no training split: "reference only" uses the SemEval-fitted weights as they are; "with
  exemplars" grades each half of a question's answers using the other half's human scores as exemplars.
- Baselines in the same run: MiniLM cosine to the reference and bag-of-words overlap with the reference,
  each thresholded on the training split (for Mohler, the raw value scaled to 0-5).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agents import scoring
from agents.grader import needs_review
from bench.common import EVAL, eval_path
from store.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
GRADING = EVAL / "grading"
SEMEVAL = GRADING / "semeval2013-task7-2way"
CACHE = ROOT / ".bench" / "grader_embeddings.npz"


@dataclass
class Question:
    id: str
    question: str
    refs: list[str]
    answers: list[tuple[str, float]]  # (text, human score as a fraction 0..1)


def load_semeval(corpus: str, split: str) -> list[Question]:
    folder = (SEMEVAL / "training" / "2way" / corpus if split == "train"
              else SEMEVAL / "test" / "2way" / corpus / "test-unseen-answers")
    out = []
    for path in sorted(folder.glob("*.xml")):
        root = ET.parse(path).getroot()
        refs = [(e.text or "").strip() for e in root.iter("referenceAnswer") if (e.text or "").strip()]
        answers = [((e.text or "").strip(), 1.0 if e.get("accuracy") == "correct" else 0.0)
                   for e in root.iter("studentAnswer") if (e.text or "").strip()]
        out.append(Question(root.get("id") or path.stem, (root.findtext("questionText") or "").strip(), refs, answers))
    return out


def load_mohler() -> list[dict]:
    rows = []
    with (GRADING / "mohler" / "mohler_assignments_1-9.csv").open(encoding="utf-8", errors="replace") as f:
        for r in csv.DictReader(f):
            answer = (r["student_answer"] or "").strip()
            if not answer or "#NAME?" in answer:  # corrupted in this copy (see its README)
                continue
            rows.append(dict(qid=r["id"], question=r["question"].strip(), ref=r["desired_answer"].strip(),
                             answer=answer, me=float(r["score_me"]), other=float(r["score_other"]),
                             avg=float(r["score_avg"])))
    return rows


class Vectors:
    """Embeds every text once; keeps vectors in .bench/ so reruns are quick."""

    def __init__(self, texts: set[str]) -> None:
        from agents.embedder import local_minilm

        embedder = local_minilm()
        cached: dict[str, np.ndarray] = {}
        key = lambda t: hashlib.sha1(f"{embedder.name}\x00{t}".encode()).hexdigest()  # noqa: E731
        if CACHE.exists():
            data = np.load(CACHE)
            cached = {k: data[k] for k in data.files}
        todo = sorted(t for t in texts if key(t) not in cached)
        if todo:
            t0 = time.monotonic()
            print(f"embedding {len(todo)} texts ...", file=sys.stderr)
            for t, v in zip(todo, embedder.embed(todo)):
                cached[key(t)] = v
            print(f"  {time.monotonic() - t0:.0f}s", file=sys.stderr)
            CACHE.parent.mkdir(exist_ok=True)
            np.savez(CACHE, **cached)
        self.vec = {t: cached[key(t)] for t in texts}


# --- metrics ---------------------------------------------------------------------------------------------

def macro_f1(y: np.ndarray, yhat: np.ndarray) -> float:
    f1s = []
    for c in (0, 1):
        tp = int(((yhat == c) & (y == c)).sum())
        fp = int(((yhat == c) & (y != c)).sum())
        fn = int(((yhat != c) & (y == c)).sum())
        f1s.append(2 * tp / max(1, 2 * tp + fp + fn))
    return float(np.mean(f1s))


def best_threshold(values: np.ndarray, y: np.ndarray) -> float:
    grid = np.unique(np.round(values, 3))
    return float(max(grid, key=lambda t: macro_f1(y, (values >= t).astype(int))))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


# --- baselines -------------------------------------------------------------------------------------------

def bow_overlap(answer: str, refs: list[str]) -> float:
    a = {w for w in scoring.words(answer) if w not in scoring.STOPWORDS}
    return max(len(a & {w for w in scoring.words(r) if w not in scoring.STOPWORDS})
               / max(1, len({w for w in scoring.words(r) if w not in scoring.STOPWORDS})) for r in refs)


def cosine(vec: dict, answer: str, refs: list[str]) -> float:
    return max(float(vec[answer] @ vec[r]) for r in refs)


# --- the grader ------------------------------------------------------------------------------------------

def rows(questions: list[Question], vec: dict, exemplars_of: dict[str, list[scoring.Exemplar]] | None,
         leave_one_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for q in questions:
        pool = exemplars_of.get(q.id, []) if exemplars_of is not None else []
        for i, (text, label) in enumerate(q.answers):
            ex = [e for j, e in enumerate(pool) if j != i] if leave_one_out else pool
            x, _ = scoring.features(q.question, q.refs, text, vec, ex)
            xs.append(x)
            ys.append(label)
    return np.asarray(xs), np.asarray(ys)


def exemplars(questions: list[Question]) -> dict[str, list[scoring.Exemplar]]:
    return {q.id: [scoring.Exemplar(t, s) for t, s in q.answers] for q in questions}


def fit(train: list[Question], vec: dict) -> tuple[scoring.Model, scoring.Model]:
    xc, yc = rows(train, vec, None)
    cold = scoring.fit_logistic(xc, yc, scoring.COLD_FEATURES)
    xw, yw = rows(train, vec, exemplars(train), leave_one_out=True)
    warm = scoring.fit_logistic(xw, yw, scoring.WARM_FEATURES)
    return cold, warm


def grade_probs(questions: list[Question], vec: dict, ex: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, whether exemplars were used) per answer."""
    out, warm = [], []
    for q in questions:
        for text, _ in q.answers:
            s = scoring.score(q.question, q.refs, text, vec, ex.get(q.id, []) if ex else ())
            out.append(s.prob)
            warm.append(s.exemplars_used > 0)
    return np.asarray(out), np.asarray(warm)


def credits(probs: np.ndarray) -> np.ndarray:
    """The share of the points the grader gives for each probability (scoring.credit)."""
    return np.array([scoring.credit(float(p)) for p in probs])


def released_mask(probs: np.ndarray, warm: np.ndarray, threshold: float, band: tuple[float, float]) -> np.ndarray:
    return np.array([not needs_review(100 * scoring.credit(p), scoring.confidence(p, w), threshold, band)
                     for p, w in zip(probs, warm)])


def release_stats(probs: np.ndarray, warm: np.ndarray, y: np.ndarray, threshold: float,
                  band: tuple[float, float]) -> tuple[float, float]:
    """(share released without review, agreement of released grades with the human label)."""
    released = released_mask(probs, warm, threshold, band)
    agree = ((probs >= 0.5).astype(int) == y)
    return float(released.mean()), float(agree[released].mean()) if released.any() else float("nan")


# --- LLM grader (optional) -------------------------------------------------------------------------------

async def llm_probs(items: list[tuple[str, str, str]]) -> list[float | None]:
    """Score (question, reference, answer) triples with the configured LLM grader; None where it failed."""
    from agents.grader import llm_grade
    from agents.llm import get_llm

    llm = get_llm(load_settings())
    sem = asyncio.Semaphore(4)
    criteria = [{"name": "correctness", "points": 100, "description": "The answer is correct and complete."}]

    async def one(q: str, ref: str, a: str) -> float | None:
        async with sem:
            try:
                result = await llm_grade(llm, q, ref, criteria, a)
            except Exception as exc:  # noqa: BLE001
                print(f"  llm failed: {exc}", file=sys.stderr)
                return None
            return result["total"] / 100.0

    return await asyncio.gather(*(one(*it) for it in items))


# --- report ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="fit COLD/WARM on the training splits and print them")
    ap.add_argument("--llm-sample", type=int, default=100, help="answers per test set for the LLM grader")
    args = ap.parse_args()
    eval_path("grading")  # (before anything starts: a line saying where it was looked for, not a traceback)
    settings = load_settings(ROOT / ".bench")
    threshold, band = settings.review_threshold, settings.review_band

    data = {c: (load_semeval(c, "train"), load_semeval(c, "test")) for c in ("sciEntsBank", "beetle")}
    mohler = load_mohler()
    texts: set[str] = set()
    for tr, te in data.values():
        for q in tr + te:
            texts.update([q.question, *q.refs, *(a for a, _ in q.answers)])
    for r in mohler:
        texts.update([r["question"], r["ref"], r["answer"]])
    vec = Vectors(texts).vec

    if args.fit:
        train = data["sciEntsBank"][0] + data["beetle"][0]
        cold, warm = fit(train, vec)
        print(f"COLD = {cold!r}\nWARM = {warm!r}")
        return

    print(f"review rule: confidence < {threshold} or total in [{band[0]:g}, {band[1]:g}] -> instructor review\n")
    print(f"{'set':<28}{'method':<34}{'acc':>7}{'macroF1':>9}{'released':>10}{'agree(rel)':>12}")
    for corpus, (train, test) in data.items():
        ytr = np.array([int(s) for q in train for _, s in q.answers])
        yte = np.array([int(s) for q in test for _, s in q.answers])
        name = f"{corpus} unseen-answers"
        for label, fn in (("bag-of-words overlap (thr. on train)", bow_overlap),
                          ("MiniLM cosine (thr. on train)", lambda a, refs: cosine(vec, a, refs))):
            vtr = np.array([fn(a, q.refs) for q in train for a, _ in q.answers])
            vte = np.array([fn(a, q.refs) for q in test for a, _ in q.answers])
            thr = best_threshold(vtr, ytr)
            yhat = (vte >= thr).astype(int)
            print(f"{name:<28}{label:<34}{(yhat == yte).mean():>7.3f}{macro_f1(yte, yhat):>9.3f}{'-':>10}{'-':>12}")
        for label, ex in (("offline grader, reference only", None), ("offline grader, with exemplars", exemplars(train))):
            p, warm = grade_probs(test, vec, ex)
            yhat = (p >= 0.5).astype(int)
            rel, agree = release_stats(p, warm, yte, threshold, band)
            print(f"{name:<28}{label:<34}{(yhat == yte).mean():>7.3f}{macro_f1(yte, yhat):>9.3f}{rel:>10.2f}"
                  f"{agree:>12.3f}")
        if load_settings().openai_api_key or load_settings().anthropic_api_key:
            rng = np.random.default_rng(0)
            flat = [(q.question, q.refs[0], a, int(s)) for q in test for a, s in q.answers]
            pick = rng.choice(len(flat), size=min(args.llm_sample, len(flat)), replace=False)
            got = asyncio.run(llm_probs([flat[i][:3] for i in pick]))
            ok = [(g, flat[i][3]) for g, i in zip(got, pick) if g is not None]
            if ok:
                p, y = np.array([g for g, _ in ok]), np.array([t for _, t in ok])
                yhat = (p >= 0.5).astype(int)
                print(f"{name:<28}{f'LLM grader (n={len(ok)})':<34}{(yhat == y).mean():>7.3f}{macro_f1(y, yhat):>9.3f}")

    y = np.array([r["avg"] for r in mohler])
    print(f"\n{'Mohler 1-9 (0-5)':<28}{'method':<34}{'r':>7}{'RMSE':>9}{'released':>10}{'|err|<=1':>12}")
    hh = np.array([r["me"] for r in mohler]), np.array([r["other"] for r in mohler])
    print(f"{'':<28}{'human vs human':<34}{pearson(*hh):>7.3f}{rmse(*hh):>9.3f}")
    for label, v in (("bag-of-words overlap x5", np.array([bow_overlap(r["answer"], [r["ref"]]) for r in mohler])),
                     ("MiniLM cosine x5", np.array([cosine(vec, r["answer"], [r["ref"]]) for r in mohler]))):
        print(f"{'':<28}{label:<34}{pearson(v, y):>7.3f}{rmse(5 * v, y):>9.3f}")
    cold = np.array([scoring.score(r["question"], [r["ref"]], r["answer"], vec).prob for r in mohler])
    warm = np.zeros(len(mohler))
    used = np.zeros(len(mohler), dtype=bool)
    by_q: dict[str, list[int]] = {}
    for i, r in enumerate(mohler):
        by_q.setdefault(r["qid"], []).append(i)
    for idx in by_q.values():
        halves = (idx[0::2], idx[1::2])
        for k, half in enumerate(halves):
            ex = [scoring.Exemplar(mohler[j]["answer"], mohler[j]["avg"] / 5) for j in halves[1 - k]]
            for i in half:
                r = mohler[i]
                s = scoring.score(r["question"], [r["ref"]], r["answer"], vec, ex)
                warm[i], used[i] = s.prob, s.exemplars_used > 0
    for label, p, u in (("offline grader, reference only", cold, np.zeros(len(mohler), dtype=bool)),
                        ("offline grader, with exemplars", warm, used)):
        released = released_mask(p, u, threshold, band)
        c = credits(p)
        close = np.abs(5 * c - y) <= 1
        print(f"{'':<28}{label:<34}{pearson(c, y):>7.3f}{rmse(5 * c, y):>9.3f}{released.mean():>10.2f}"
              f"{close[released].mean() if released.any() else float('nan'):>12.3f}")


if __name__ == "__main__":
    main()
