"""Draft assignments from a chapter's transcript, each citing the moment it is based on.

Offline (default): the chapter's key sentences — those carrying its most distinctive words against the
rest of the course — become short-answer items (the sentence is the reference answer) and fill-in-the-blank
multiple-choice items whose distractors are distinctive words of other chapters (closer in meaning to the
answer for harder items). With a chat model configured, the model writes the items from the timestamped
transcript; an item whose cited time is not a real sentence of the chapter is dropped, and if nothing
usable comes back the offline items are used.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
from langcodes import closest_supported_match
from wordfreq import available_languages, get_frequency_list
from wordfreq.preprocess import preprocess_text

from agents.embedder import primary
from agents.llm import LLM, LLMError, first_json_object
from agents.scoring import STOPWORDS, stem
from store.frames import LINE_CONTROL, as_read, mmss, text_problem

logger = logging.getLogger(__name__)

# Transcript filler on top of the scorer's stop words: spoken words that are never the point.
FILLER = frozenset("""
actually basically going gonna really right okay yeah kind sort thing things stuff something anything lot lots
know mean just like well maybe pretty little want wanna said says say saying look looking talk talking today
will also able first second next last back even still much many every another people make makes made take
takes used using use way ways good great better best called call let lets thats theres heres whats dont doesnt
never always often sometimes usually other after before through between during without against until since while
again down away ever someone doing please sure keep give find
""".split())
# A whole word of 4+ letters in any script (hyphens inside): "Schrödinger" was cut to "dinger" and "ResNet50" to
# "resnet", and a keyword that is not a whole word blanks nothing
_WORD = re.compile(r"(?<![^\W_])[^\W\d_](?:[^\W\d_]|-(?=[^\W\d_])){3,}(?![\w-])")
MIN_WORDS, MAX_WORDS = 8, 45
MIN_SCORE_SHARE = 0.3  # of the best sentence's score

GENERATE_SYSTEM = """You write practice questions for learners from a lecture transcript. Each question must be
answerable from one moment of the transcript and cite that moment's start time exactly as given in brackets.
Reply with one JSON object and nothing else: {"items": [{"type": "multiple_choice" | "short_answer", "prompt":
"...", "options": ["..."] (multiple_choice only, 4 options), "correct": [index, ...] (multiple_choice only),
"reference_answer": "..." (short_answer only), "start": <seconds as in the brackets>}]}"""


@dataclass(frozen=True)
class Sentence:
    start: float
    end: float
    text: str


@dataclass
class Draft:
    type: str
    title: str
    prompt: str
    difficulty: str
    citation: dict[str, Any]
    options: list[str] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    reference_answer: str = ""


# Beyond English (whose stop and filler words are listed above), a word this common in the lecture's language (Zipf
# scale: about once in 250,000 words or more) is never what an item hinges on: "durante", "während", "leurs" (with
# English lists only, a Spanish chapter blanked "durante"). Common nouns go too ("tiempo", "vida"), which are seldom a
# chapter's point. Languages wordfreq has no list for keep the English lists only.
COMMON_ZIPF = 5.6


@functools.lru_cache(maxsize=32)
def _common_words(language: str) -> tuple[str, frozenset[str]]:
    """(wordfreq's code for the language, its words at COMMON_ZIPF or more), from wordfreq's frequency list: no
    tokenizer is needed, which the per-word lookup wanted for Chinese, Japanese or Korean. No words for English
    and for languages without a list, or a near one ("no" is "nb", "sr"/"hr"/"bs" are "sh"; "cy" or "haw" have none)."""
    code = (language or "en").lower().replace("_", "-").split("-")[0]
    if code != "en":
        code = closest_supported_match(code, list(available_languages()), max_distance=10) or "en"
    if code == "en":
        return code, frozenset()
    buckets = get_frequency_list(code)  # bucket i: words of frequency 10 ** (-i / 100)
    return code, frozenset(w for bucket in buckets[: int(round((9 - COMMON_ZIPF) * 100)) + 1] for w in bucket)


@functools.lru_cache(maxsize=65_536)  # a generation request reads the course's other chapters once per target
def _terms(text: str, language: str = "en") -> tuple[str, ...]:
    code, common = _common_words(language)
    # (looked up as wordfreq lists words: its casefolding, "weiß" as "weiss", a final "ς" as "σ")
    return tuple(w.lower() for w in _WORD.findall(text)
                 if w.lower() not in STOPWORDS and w.lower() not in FILLER
                 and not (common and preprocess_text(w.lower(), code) in common))


def _tf(group: list[Sentence], language: str = "en") -> Counter:
    return Counter(t for s in group for t in _terms(s.text, language))


def _weights(chapter: list[Sentence], others: list[list[Sentence]], language: str = "en") -> dict[str, float]:
    """tf-idf of the chapter's words against the other chapters (or its own sentences when alone)."""
    tf = _tf(chapter, language)
    docs = ([set(_tf(group, language)) for group in others] if others
            else [set(_terms(s.text, language)) for s in chapter])
    df = Counter(t for d in docs for t in d)
    n = len(docs)
    return {w: c * math.log((1 + n) / (1 + df[w])) for w, c in tf.items()}


def _pool_weights(chapter: list[Sentence], others: list[list[Sentence]], per_group: int, language: str = "en"
                  ) -> Counter:
    """Each other chapter's `per_group` best words by tf-idf against the rest (the other chapters and this one),
    the best weight of each word: document frequencies counted once, each chapter's own taken back out (it
    was computed per chapter against all the rest: quadratic in the course's chapters)."""
    tfs = [_tf(g, language) for g in others]
    df = Counter(t for d in [*tfs, _tf(chapter, language)] for t in set(d))
    n = len(others)  # the rest of each one: the other others, and the chapter
    best: Counter = Counter()
    for tf in tfs:  # a word of this chapter is in df once for it
        w = {t: c * math.log((1 + n) / df[t]) for t, c in tf.items()}
        for term, v in sorted(w.items(), key=lambda x: -x[1])[:per_group]:
            best[term] = max(best[term], v)
    return best


def key_sentences(chapter: list[Sentence], others: list[list[Sentence]], count: int, language: str = "en"
                  ) -> list[tuple[Sentence, str]]:
    """The `count` most informative sentences with the keyword each one hinges on, in time order."""
    weights = _weights(chapter, others, language)
    scored = []
    for s in chapter:
        n = len(s.text.split())
        terms = set(_terms(s.text, language))
        if not MIN_WORDS <= n <= MAX_WORDS or not terms:
            continue
        score = sum(weights.get(t, 0.0) for t in terms) / math.sqrt(n)
        scored.append((score, s, sorted(terms, key=lambda t: (-weights.get(t, 0.0), t))))
    scored.sort(key=lambda x: (-x[0], x[1].start))
    if scored:  # small talk and asides carry little of the chapter's vocabulary: never an item
        scored = [x for x in scored if x[0] >= MIN_SCORE_SHARE * scored[0][0]]
    chosen: list[tuple[Sentence, str]] = []
    used_keywords: set[str] = set()
    for _, s, ranked in scored:
        # each item hinges on another word; a name only when nothing else will do (blanked, "Alice" among common
        # words gives itself away)
        ranked = sorted(ranked, key=lambda t: _named(s.text, t))
        kw = next((t for t in ranked if t not in used_keywords), None)
        if kw is None or any(abs(s.start - c.start) < 1e-6 for c, _ in chosen):
            continue
        chosen.append((s, kw))
        used_keywords.add(kw)
        if len(chosen) >= count:
            break
    return sorted(chosen, key=lambda x: x[0].start)


_ANY_WORD = re.compile(r"(?<![^\W_])[^\W_](?:[\w']|-(?=\w))*")


def _named(text: str, keyword: str) -> bool:
    """Whether the keyword is a name in the sentence: every time it is said, capitalized, not only where a
    sentence starts."""
    kw = keyword.lower()
    said = [m for m in _ANY_WORD.finditer(text) if m.group(0).lower().startswith(kw)]
    return bool(said) and all(m.group(0)[:1].isupper() for m in said) and any(
        m.start() > 0 and not re.search(r"[.?!]\s*$", text[:m.start()]) for m in said)


def _blank(text: str, keyword: str) -> str:
    """The sentence with the keyword blanked wherever it is said, in any form ("parameters" for "parameter",
    "painful" for "pain"): no give-away. A possessive keeps its "'s" ("_____'s signature")."""
    kw = keyword.lower()
    root = stem(kw)

    def hide(m: re.Match[str]) -> str:
        w = m.group(0).lower()
        if w == kw or w.startswith(kw) or stem(w) == root:
            return "_____'s" if w.endswith("'s") and (w[:-2] == kw or stem(w[:-2]) == root) else "_____"
        return m.group(0)

    return _ANY_WORD.sub(hide, text)


_AT = re.compile(r" \(\d+:\d\d\)$")  # the moment a generated title ends with


def masked(text: str, answers: list[str]) -> str:
    """`text` (an item's title, its concept) without the answer's words, nor words sharing their stem, nor the
    answer itself however short ("O(1)", "42"): learners see those beside the question, and a chapter title is
    often the very sentence the answer was blanked from. A title's closing "(m:ss)" is kept."""
    at = _AT.search(text)
    head, tail = (text[: at.start()], at.group()) if at else (text, "")
    for answer in answers:
        phrase = " ".join(answer.split())
        if re.search(r"[^\W_]", phrase):  # the whole answer, where it is not part of a longer word
            head = re.sub(rf"(?<![^\W_]){re.escape(phrase)}(?![^\W_])", "…", head, flags=re.I)
        for word in re.findall(r"[^\W_]{3,}", answer):
            stem = word[:5] if len(word) > 5 else word
            head = re.sub(rf"\b{re.escape(stem)}[^\W_]*", "…", head, flags=re.I)
    return head + tail


def gives_away(text: str, reference: str) -> bool:
    """Whether `text` (a title or concept learners see) says a written answer's reference: half or more of the
    reference's words of four letters or more (by their first five letters; at least two), or every one of them. A
    chapter's extractive title is one of its key sentences, often the very one a short answer's reference is."""
    ref = {w[:5] for w in re.findall(r"[^\W_]{4,}", reference.lower())}
    if not ref:
        return False
    have = {w[:5] for w in re.findall(r"[^\W_]{4,}", text.lower())}
    return ref <= have or len(ref & have) >= max(2, (len(ref) + 1) // 2)


def neutral_title(prompt: str, title: str, kind: str = "short_answer") -> str:
    """A title that says what an item is about without its answer: the prompt's quoted keyword (a few words, not a
    quoted sentence with a blank in it), else "Written answer" (for a multiple-choice item "Question"), with the
    title's moment."""
    at = _AT.search(title)
    kw = next((q for q in re.findall(r"\u201c([^\u201d]{1,40})\u201d", prompt)
               if "_" not in q and len(q.split()) <= 4), None)
    fallback = "Question" if kind == "multiple_choice" else "Written answer"
    return (f"About \u201c{kw}\u201d" if kw else fallback) + (at.group() if at else "")


def _seed(*parts: object) -> int:
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _look(word: str) -> str:
    """What makes two options look alike: their first five letters, a final y read as i ("happy", "happiness")."""
    w = word.lower()
    return (w[:-1] + "i" if w.endswith("y") else w)[:5]


def _distractors(keyword: str, sentence: str, pool: list[str], difficulty: str, embedder: Any) -> list[str]:
    """Three wrong options: words of other chapters, closer in meaning to the answer when harder."""
    in_sentence = set(_terms(sentence))
    taken = {_look(keyword)}
    cands = []
    for w in dict.fromkeys(pool):  # one word per look: "therapies" and "therapists", "happy" and "happiness"
        if w not in in_sentence and _look(w) not in taken:
            cands.append(w)
            taken.add(_look(w))
    if len(cands) < 3:
        return []
    vecs = primary(embedder).embed([keyword, *cands])  # the 0.9 below is on MiniLM's scale
    sims = vecs[1:] @ vecs[0]
    order = [cands[i] for i in np.argsort(-sims) if sims[i] < 0.9]  # not near-synonyms of the answer
    if len(order) < 3:
        return []
    third = max(3, len(order) // 3)
    band = {"hard": order[:third], "medium": order[third:2 * third] or order[:third], "easy": order[-third:]}[difficulty]
    rng = np.random.default_rng(_seed(keyword, sentence))
    return [band[i] for i in rng.choice(len(band), size=3, replace=False)] if len(band) >= 3 else order[:3]


def offline_items(chapter_title: str, video_id: int, chapter: list[Sentence], others: list[list[Sentence]],
                  count: int, difficulty: str, types: list[str], embedder: Any, *, language: str = "en") -> list[Draft]:
    """Draft items from the chapter's key sentences (blocking: call in a thread). `language`: the lecture's (an ISO
    639-1 code, as whisper gives it)."""
    pool_weights = _pool_weights(chapter, others, 40, language)
    if not others:  # one chapter only: distractors from the chapter's own other sentences
        w = _weights(chapter, [], language)
        pool_weights.update(dict(sorted(w.items(), key=lambda x: -x[1])[:60]))
    pool = [t for t, _ in pool_weights.most_common(120)]
    out: list[Draft] = []
    for i, (s, kw) in enumerate(key_sentences(chapter, others, count, language)):
        kind = types[i % len(types)]
        cite = {"video_id": video_id, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
        title = f"{chapter_title[:80]} ({mmss(s.start)})"
        if "_____" not in _blank(s.text, kw):  # (defensive: a keyword that is not a word of the sentence)
            continue
        if kind == "multiple_choice":
            wrong = _distractors(kw, s.text, pool, difficulty, embedder)
            if len(wrong) == 3:
                options = [kw, *wrong]
                rng = np.random.default_rng(_seed("order", s.start, kw))
                order = list(rng.permutation(4))
                shuffled = [options[j] for j in order]
                out.append(Draft("multiple_choice", title, f"Fill in the blank, as said in the lecture at "
                                 f"{mmss(s.start)}:\n\n\u201c{_blank(s.text, kw)}\u201d", difficulty, cite,
                                 options=shuffled, correct=[order.index(0)]))
                continue
            if "short_answer" not in types:  # no good distractors: no item, rather than one of a kind not asked for
                continue
            kind = "short_answer"  # not enough distinct words elsewhere for good distractors
        reference = s.text
        if difficulty == "hard":
            nxt = [x for x in chapter if x.start > s.start][:1]
            reference = " ".join([s.text, *(x.text for x in nxt)])
        ask = {"easy": f"What does the lecture say about \u201c{kw}\u201d?",
               "medium": f"Explain in your own words what the lecture says about \u201c{kw}\u201d.",
               "hard": f"Explain what the lecture says about \u201c{kw}\u201d, and why it matters."}[difficulty]
        out.append(Draft("short_answer", title, f"{ask} (lecture at {mmss(s.start)})", difficulty, cite,
                         reference_answer=reference))
    return out


class _LLMItem(msgspec.Struct):
    type: str
    prompt: str
    start: float
    options: list[str] = []
    correct: list[int] = []
    reference_answer: str = ""


class _LLMItems(msgspec.Struct):
    items: list[Any]  # each checked on its own: one malformed item does not cost the others


async def llm_items(llm: LLM, chapter_title: str, video_id: int, chapter: list[Sentence], count: int,
                    difficulty: str, types: list[str]) -> list[Draft]:
    """Items written by the chat model, kept only when they cite a real sentence of the chapter."""
    transcript = "\n".join(f"[{s.start:.1f}] {s.text}" for s in chapter)[:24_000]
    prompt = (f"Chapter: {chapter_title}\nWrite {count} {difficulty} questions of these types: {', '.join(types)}."
              f"\n\nTranscript:\n{transcript}")
    try:
        # room for every item asked for (about 300 tokens each; a reply cut at the limit is no JSON at all), within
        # the 4,096 output tokens every current model allows
        completion = await llm.complete([{"role": "user", "content": prompt}], system=GENERATE_SYSTEM,
                                        max_tokens=min(4096, max(1500, 350 * count)))
        if completion.truncated:
            logger.warning("LLM generation reached its length limit; keeping what parses")
        items = msgspec.json.decode(first_json_object(completion.text), type=_LLMItems).items
    except (LLMError, ValueError, RecursionError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        # ValueError: no JSON object in the reply, or text that cannot be encoded (a lone surrogate)
        logger.warning("LLM generation failed, using offline items: %s", exc)
        return []
    out: list[Draft] = []
    for raw in items:
        if len(out) == count:
            break
        try:
            it = msgspec.convert(raw, _LLMItem)
        except msgspec.ValidationError:
            continue
        s = min(chapter, key=lambda x: abs(x.start - it.start))
        if abs(s.start - it.start) > 2.0 or it.type not in types:
            continue
        # the rules an instructor's own assignment meets: something visible, within the limits, no control
        # characters (an option is one line; NUL, which Postgres cannot store, is one of them)
        if (text_problem(it.prompt, 10_000) or len(it.options) > 10
                or (it.reference_answer and text_problem(it.reference_answer, 10_000))
                or any(text_problem(o, 500) or LINE_CONTROL.search(o) for o in it.options)):
            continue
        cite = {"video_id": video_id, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
        title = f"{chapter_title[:80]} ({mmss(s.start)})"
        if it.type == "multiple_choice":
            if len(it.options) < 2 or not it.correct or any(not 0 <= c < len(it.options) for c in it.correct):
                continue
            if len(set(it.correct)) >= len(it.options):
                continue  # every option right: nothing to choose
            if len({as_read(o) for o in it.options}) < len(it.options):
                continue  # the rule an instructor's own item meets: options differ as a learner reads them
            out.append(Draft("multiple_choice", title, it.prompt.strip(), difficulty, cite,
                             options=[o.strip() for o in it.options], correct=sorted(set(it.correct))))
        elif it.type in ("short_answer", "essay") and it.reference_answer:
            out.append(Draft(it.type, title, it.prompt.strip(), difficulty, cite,
                             reference_answer=it.reference_answer.strip()))
    return out
