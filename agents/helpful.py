"""The tutor's check of a learner's reply to someone's question in a room: does the course say the same?

A reply the check accepts is marked helpful by the tutor (store.progress.mark_helpful, `helpful_answer` XP); the
worker runs it (ingest/replies.py). The question is looked up in the course videos as the tutor would
(agents/tutor.py: retrieve, judge); a question the videos do not cover cannot be checked, so nothing is marked.

Offline the reply is scored against the moments the tutor found, with the grader's scorer (agents/scoring.py)
and the embedder's similarity to the closest moment; thresholds in MIN_* (bench/helpful_eval.py measures them:
the course's own answers to its questions against wrong answers from the same video, answers to other videos'
questions, restated questions and empty replies). A wrong mark gives XP to a wrong answer, a missed one only
leaves the mark to staff: the thresholds favour precision. With a chat model configured, the model decides from
the same moments; should it fail, the offline check does.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from agents import scoring
from agents.evidence import mmss
from agents.grader import embed_cached
from agents.llm import LLM, LLMError, first_json_object

logger = logging.getLogger(__name__)

# Offline acceptance (all three): the scorer's probability against the top moments, the cosine to the closest
# one, and the share of a moment's key concepts the reply covers. Chosen on the eval course (bench.helpful_eval),
# where they mark about 7 in 10 reference answers and 2 in 60 wrong answers about the same video.
MIN_PROB = 0.25
MIN_COS = 0.82
MIN_COVERAGE = 0.15
SOURCES = 3  # the tutor's top moments the reply is compared with
MIN_CONCEPTS = 2  # a reply with fewer content words ("yes", "same here") answers nothing
LLM_MIN_CONFIDENCE = 0.8

# What a question opens with, when it has no question mark ("how do I …", "can someone explain …").
_ASKING = re.compile(r"^\s*(?:who|what|when|where|why|how|which|whose|whom|is|are|was|were|do|does|did|can|could|"
                     r"should|would|will|has|have|had|may|might|must|shall|anyone|somebody|someone|explain|help)\b",
                     re.I)

SYSTEM = """You check a learner's reply to another learner's question in a course's chat, for the course's tutor.
Use only the transcript excerpts from the course videos. The reply is helpful when it answers the question and what
it says agrees with the excerpts; a reply that is wrong, off the point, only repeats the question, or only points
elsewhere ("rewatch the video") is not. Answer with one JSON object and nothing else:
{"helpful": true or false, "confidence": 0 to 1, "why": "one short sentence"}"""


@dataclass(frozen=True, slots=True)
class Check:
    status: str  # "helpful" | "not_helpful" | "skipped" (nothing to check: not a question, not in the videos)
    reason: str
    score: float | None = None  # offline: the scorer's probability; with a model: its confidence
    checker: str = "offline"

    @property
    def helpful(self) -> bool:
        return self.status == "helpful"


def asks(text: str) -> bool:
    """Whether a message asks something: a question mark, or a question's opening words."""
    return "?" in text or _ASKING.match(text) is not None


class _Verdict(msgspec.Struct):
    helpful: bool
    confidence: float
    why: str = ""


async def check_reply(tutor: Any, embedder: Any, llm: LLM | None, course_id: int, question: str,
                      reply: str) -> Check:
    """Whether `reply` answers `question` the way the course videos do (see the module's docstring)."""
    question, reply = question.strip(), reply.strip()
    if not asks(question):
        return Check("skipped", "the message replied to does not ask anything")
    if reply.endswith("?"):
        return Check("skipped", "the reply asks a question of its own")
    if len(set(scoring.concepts(reply))) < MIN_CONCEPTS:
        return Check("not_helpful", "the reply is too short to answer the question")
    state: dict[str, Any] = {"course_id": course_id, "question": question, "history": [], "standalone": question}
    state.update(await tutor.retrieve(state))
    state.update(await tutor.judge(state))
    sources = (state.get("sources") or [])[:SOURCES]
    if not state.get("grounded") or not sources:
        return Check("skipped", "the course videos do not cover the question, so the reply cannot be checked")
    refs = [w.text for w in sources]
    if scoring.restates_question(question, refs, reply):
        return Check("not_helpful", "the reply repeats the question")
    best = sources[0]
    where = f"{best.video_title!r} at {mmss(best.start)}"
    if llm is not None:
        try:
            return await _llm_check(llm, question, reply, sources, where)
        except LLMError as exc:  # the offline check decides instead
            logger.warning("reply check by %s failed, checking offline: %s", llm.name, exc.message)
    vec = await asyncio.to_thread(embed_cached, embedder, scoring.texts_to_embed(question, refs, [reply]))
    scored = scoring.score(question, refs, reply, vec)
    cos = [float(vec[reply] @ vec[r]) for r in refs]
    closest = sources[max(range(len(refs)), key=cos.__getitem__)]
    if scored.prob >= MIN_PROB and max(cos) >= MIN_COS and scored.features["coverage"] >= MIN_COVERAGE:
        return Check("helpful", f"agrees with {closest.video_title!r} at {mmss(closest.start)}", scored.prob)
    return Check("not_helpful", f"could not confirm it against {where}", scored.prob)


async def _llm_check(llm: LLM, question: str, reply: str, sources: list, where: str) -> Check:  # type: ignore[type-arg]
    listing = "\n\n".join(f"[{i}] ({json.dumps(w.video_title)}, {mmss(w.start)}) {json.dumps(w.text)}"
                          for i, w in enumerate(sources, 1))
    prompt = (f"Transcript excerpts:\n{listing}\n\nQuestion: {json.dumps(question[:2000])}\n\n"
              f"Reply to check: {json.dumps(reply[:4000])}")
    c = await llm.complete([{"role": "user", "content": prompt}], system=SYSTEM, max_tokens=150, temperature=0.0)
    try:
        v = msgspec.json.decode(first_json_object(c.text), type=_Verdict)
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LLMError(f"{llm.name}: unusable reply check: {exc}", retryable=False, provider=llm.name) from exc
    conf = min(1.0, max(0.0, v.confidence))
    why = " ".join(v.why.split())[:200]
    checker = f"llm:{llm.name}:{c.model}"
    if v.helpful and conf >= LLM_MIN_CONFIDENCE:
        return Check("helpful", why or f"agrees with {where}", conf, checker)
    return Check("not_helpful", why or f"could not confirm it against {where}", conf, checker)
