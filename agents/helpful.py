"""The tutor's check of a learner's reply to someone's question in a room: does the course say the same?

A reply the check accepts is marked helpful by the tutor (store.progress.mark_helpful, `helpful_answer` XP); the
worker runs it (ingest/replies.py). The question is looked up in the course videos as the tutor would
(agents/tutor.py: retrieve, judge); a question the videos do not cover cannot be checked, so nothing is marked.

Offline the reply is scored against the moments the tutor found, with the grader's scorer (agents/scoring.py)
and the embedder's similarity to the closest moment; thresholds in MIN_* (bench/helpful_eval.py measures them:
the course's own answers to its questions against the same negated, wrong answers from the same video, answers to
other videos' questions, restated questions and empty replies). Similarity cannot tell a claim from its opposite,
so a reply that resembles the moments but denies, counts or opposes differently is not taken (`contradicts`). A
wrong mark gives XP to a wrong answer, a missed one only leaves the mark to staff: the check favours precision.
With a chat model configured, the model decides from the same moments (and the reply must be as close to one as
offline, with nothing `contradicts` finds); should it fail, the offline check does. A mark's reason is always the
moment the reply agrees with.
"""
from __future__ import annotations

import asyncio
import dataclasses
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
from store.frames import CONTROL, without_format
from store.replies import NOT_COVERED

logger = logging.getLogger(__name__)

# Offline acceptance (all three): the scorer's probability against the top moments, the cosine to the closest
# one, and the share of a moment's key concepts the reply covers. Chosen on the eval course (bench.helpful_eval):
# with `contradicts`, about half of the reference answers are marked, 2 in 60 wrong answers about the same video.
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
        return Check("skipped", NOT_COVERED)
    refs = [w.text for w in sources]
    if scoring.restates_question(question, refs, reply):
        return Check("not_helpful", "the reply repeats the question")
    vec = await asyncio.to_thread(embed_cached, embedder, scoring.texts_to_embed(question, refs, [reply]))
    cos = [float(vec[reply] @ vec[r]) for r in refs]
    closest = sources[max(range(len(refs)), key=cos.__getitem__)]
    agrees = f"agrees with {closest.video_title!r} at {mmss(closest.start)}"
    unconfirmed = f"could not confirm it against {sources[0].video_title!r} at {mmss(sources[0].start)}"
    if llm is not None:
        try:
            verdict = await _llm_check(llm, question, reply, sources)
        except LLMError as exc:  # the offline check decides instead
            logger.warning("reply check by %s failed, checking offline: %s", llm.name, exc.message)
        else:
            if not verdict.helpful:
                return verdict
            # and as close to a moment, and as free of claims the moments do not make, as offline: a reply that
            # copies a moment with a "not" added and an instruction to the model is not marked for the instruction
            if max(cos) < MIN_COS:
                return dataclasses.replace(verdict, status="not_helpful", reason=unconfirmed)
            if (why := contradicts(reply, refs)) is not None:
                return dataclasses.replace(verdict, status="not_helpful", reason=why)
            return dataclasses.replace(verdict, reason=agrees)
    scored = scoring.score(question, refs, reply, vec)
    if scored.prob >= MIN_PROB and max(cos) >= MIN_COS and scored.features["coverage"] >= MIN_COVERAGE:
        if (why := contradicts(reply, refs)) is not None:
            return Check("not_helpful", why, scored.prob)
        return Check("helpful", agrees, scored.prob)
    return Check("not_helpful", unconfirmed, scored.prob)


# Word pairs where a reply saying one where the moments say the other has likely swapped a fact.
_OPPOSITES = [frozenset(p.split()) for p in """more less|higher lower|larger smaller|bigger smaller|increase decrease|
increases decreases|before after|always never|true false|public private|first last|maximum minimum|positive negative|
inside outside|above below|faster slower|older younger|richer poorer|happier sadder|left right|same different|
singular invertible|dependent independent|rare common|easy hard|cheap expensive|input output|win lose|add subtract|
rows columns|row column|horizontal vertical|dominant recessive|male female|gain loss|early late|good bad|
better worse|best worst|high low|large small|big small|strong weak|long short|increasing decreasing|most least|
fast slow|old young|rich poor|happy unhappy|happy sad|possible impossible|likely unlikely|all none|many few|
top bottom|start end|open closed|wrong right|success failure|up down""".replace("\n", "")
              .split("|")]
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
REACH = 3  # words either side of a word that say what it is about


_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SENTENCE = re.compile(r"(?<=[.!?;:])\s+")
# number words and the digits they stand for ("thousand" -> "1000")
_NUMBER_WORDS = ({w: str(i) for i, w in enumerate(_ONES)} | {w: str(20 + 10 * i) for i, w in enumerate(_TENS)}
                 | {w: str(v) for w, v in _SCALES.items()})


def _spoken(n: str) -> str | None:
    """A whole number under 100 as a transcript writes it out ("21" -> "twenty one")."""
    if not n.isdigit() or int(n) >= 100:
        return None
    i = int(n)
    return _ONES[i] if i < 20 else _TENS[i // 10 - 2] + ("" if i % 10 == 0 else " " + _ONES[i % 10])


def _denials(text: str, reach: int = 4) -> list[set[str]]:
    """What each negation in `text` denies: the ideas (scoring.concepts) of the `reach` words after it, in its
    sentence ("not just a lookup table" -> {lookup, table}); a bare "No." denies nothing checkable."""
    out = []
    for sent in _SENTENCE.split(text):
        ws = scoring.words(sent)
        out += [set(scoring.concepts(" ".join(ws[i + 1:i + 1 + reach]))) for i, w in enumerate(ws)
                if w in scoring.NEGATIONS]
    return out


def contradicts(reply: str, refs: list[str]) -> str | None:
    """Why the offline check cannot take the reply as agreeing with the moments `refs` although it resembles them
    (None: nothing found). Similarity cannot tell a claim from its opposite, so a reply that denies what the moments
    do not deny (what a negation of its is about is not what one of theirs is about: `_denials`), gives a number
    they do not (in digits or words), or says one of a pair of opposites where they say the other about the same
    things (or only the other) is left to staff or a chat model: "a haldane is not a unit of rate", "a thousand
    dollars more" where they say a hundred, "when they feel unusually good" where they say bad."""
    heard_text = " ".join(refs)
    mine, theirs_words = scoring.words(reply), scoring.words(heard_text)
    said, heard = set(mine), set(theirs_words)
    denied = [d for d in _denials(reply) if d]
    if denied:
        theirs = _denials(heard_text)
        if any(not any(d & t for t in theirs) for d in denied):
            return "it denies something the videos around the question do not deny"
    digits = _numbers(heard_text)
    for n in _numbers(reply) - digits:
        if (words := _spoken(n)) is None or not set(words.split()) <= heard:
            return f"the videos around the question do not say {n}"
    for w in sorted((said & _NUMBER_WORDS.keys()) - heard):  # "a thousand dollars" where they say "a hundred"
        if _NUMBER_WORDS[w] not in digits:
            return f"the videos around the question do not say {w!r}"
    for pair in _OPPOSITES:
        if len(said & pair) != 1:  # neither, or both (it weighs one against the other: nothing to tell)
            continue
        (w,) = said & pair
        (other,) = pair - {w}
        if other not in heard:
            continue
        # what the word is about in the reply, and whether the moments say its opposite about that (at least two of
        # those ideas near it) more closely than they say the word itself
        about = _around(mine, w)
        if w not in heard or _fit(theirs_words, other, about) > max(1, _fit(theirs_words, w, about)):
            return f"the videos around the question say {other!r} where it says {w!r}"
    return None


def _numbers(text: str) -> set[str]:
    """The numbers written in digits in `text`, without thousands separators ("12,288" -> "12288")."""
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def _near(ws: list[str], i: int) -> set[str]:
    """The ideas within REACH words of word `i` of `ws`."""
    return set(scoring.concepts(" ".join(ws[max(0, i - REACH):i] + ws[i + 1:i + 1 + REACH])))


def _around(ws: list[str], word: str) -> set[str]:
    """The ideas within REACH words of each `word` in `ws`."""
    return set().union(*(_near(ws, i) for i, w in enumerate(ws) if w == word))


def _fit(ws: list[str], word: str, about: set[str]) -> int:
    """How many of `about` stand within REACH words of `word` at its best place in `ws` (0 when it is not there)."""
    return max((len(about & _near(ws, i)) for i, w in enumerate(ws) if w == word), default=0)


async def _llm_check(llm: LLM, question: str, reply: str, sources: list) -> Check:  # type: ignore[type-arg]
    """The model's verdict (its `why` as the reason: stored, never shown to the room). LLMError when it fails."""
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
    # (a NUL could not be stored: the check failed on every try, and never fell back to the offline one)
    why = " ".join(without_format(CONTROL.sub("", v.why)).split())[:200] or "the model found it not helpful"
    helpful = v.helpful and conf >= LLM_MIN_CONFIDENCE
    return Check("helpful" if helpful else "not_helpful", why, conf, f"llm:{llm.name}:{c.model}")
