"""Does the retrieved evidence answer the question? An offline judge from retrieval and vocabulary signals.

Declines when
- the best evidence is far from the question (nothing in the course is about it), or
- the question names something the course never says: a proper name or acronym ("Ethereum", "RoPE", "GPT-2")
  that no video mentions, in any form, or
- the question hinges on a term that is rare in general English and that no video says in any inflection
  ("hashing" is covered by "hash", "determinant" is not covered by "determine"), or whose stem the course lacks.

The names and terms are checked against the words the course's transcripts actually use (store: video_words,
course_term_df), so the judge needs no list of topics and nothing about the questions it will be asked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from wordfreq import zipf_frequency

from agents.evidence import terms
from store.videos import fold

MIN_DENSE = 0.25  # MiniLM cosine of the best chunk; below this nothing in the course is about the question
RARE_ZIPF = 3.0  # rarer than once per million words of English (zipf 3) and absent from the course: uncovered
MIN_NAME_LEN = 3  # shorter capitalized tokens are notation ("Ax", "Mr") more often than names
COMMON_ZIPF = 5.0  # a capitalized word this common in English ("What", "World") is not taken for a name
SHOUTED_ZIPF = 4.0  # nor a word in capitals this common and longer than SHOUTED_MIN_LEN letters ("HONESTLY", "PLEASE"):
SHOUTED_MIN_LEN = 4  # acronyms are mostly shorter ("FIFA", "NASA")
# Below this cosine the best evidence must also share a word with the question: "Is this on the exam?", "42" or "Can
# you help me with my homework?" came within 0.26-0.37 of some moment that says none of their words, and were
# answered with it (the eval's answerable questions all share a word with their sources; a paraphrase sharing none
# stood at 0.47)
MIN_DENSE_UNSHARED = 0.4
SELF_NAMES = frozenset({"tutor"})  # learners address the tutor by name; the course need not say it

# the tokenization of store/videos.py WORD_RE (accents folded), on the question's original case
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")
_MENTION = re.compile(r"@[\w.-]+")
# Greetings and courtesies: a message made of nothing else asks the course nothing ("hi" was answered, cited, with the
# course's "Hi." and "Thank you." moments)
SMALL_TALK = frozenset("""hi hello hey hiya yo howdy greetings thanks thank thx ty you cool great nice good
    morning afternoon evening night bye goodbye cheers awesome wow lol there all much very tutor perfect everyone
    everybody folks guys lot""".split())
# ...and replies: after a tutor's question ("yes", "no") or answer ("again please") they go on with what came before,
# which the condensed question holds; small talk only when nothing was borrowed
REPLIES = frozenset("ok okay please sorry yes no yeah yep nope again so".split())
# what may stand between the end of a sentence and the next word: spaces, quotes, brackets, dashes
_OPENERS = " \t\r\n\"'“”‘’([{-–—*_"
_ABBREVIATION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.")
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "prof", "st", "vs", "etc", "e.g", "i.e", "cf", "jr", "sr",
                            "mt", "no", "fig", "eq"})
_ABBREVIATION_MAX = max(len(a) for a in _ABBREVIATIONS)


@dataclass
class Verdict:
    grounded: bool
    details: dict = field(default_factory=dict)


def _base(word: str) -> str:
    w = fold(word).lower()
    return w[:-2] if w.endswith("'s") else w


def forms(word: str) -> list[str]:
    """The spellings that count as the course saying `word`: its inflections (plural, possessive, -ed, -ing,
    -ly), from whichever of them the question used. Not derivations: "determinant" is not "determine". A name
    and the number after it ("SHA 256", a candidate's space) count as said joined ("sha256", "sha-256"): not by the
    name alone, which would cover "GPT-2" in a course that says "GPT-3" (a course's words are single tokens, so one
    saying "sha 256" apart does not cover it either)."""
    if " " in word:
        name, number = word.rsplit(" ", 1)
        return sorted({f"{_base(name)}{number}", f"{_base(name)}-{number}"})
    w = _base(word)
    bases = {w}
    for suffix, back in (("ies", "y"), ("ied", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("ing", ""),
                         ("ing", "e"), ("ly", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 2:
            stem = w[: -len(suffix)] + back
            bases.add(stem)
            if back == "" and len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
                bases.add(stem[:-1])  # stopped -> stop
    out = set()
    # a name written with or without a hyphen between its letters and its number: "SHA-256" is the course's
    # "sha256", "GPT3" its "gpt-3" (both were declined as not covered)
    if "-" in w:
        out.add(w.replace("-", ""))
    elif re.search(r"[a-z]\d|\d[a-z]", w):
        out.add(re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", "-", w))
    for b in bases:
        out |= {b, b + "'s", b + "s", b + "es", b + "ed", b + "d", b + "ing", b + "ly"}
        if b.endswith("y"):
            out |= {b[:-1] + "ies", b[:-1] + "ied"}
        if b.endswith("e"):
            out.add(b[:-1] + "ing")
    return sorted(out)


def opens_sentence(text: str, start: int) -> bool:
    """Whether the token at `start` opens a sentence: nothing but openers before it since the text began, a
    line break, or a sentence end (not an abbreviation such as "Dr.")."""
    i = start
    while i > 0 and text[i - 1] in _OPENERS:
        if text[i - 1] == "\n":
            return True
        i -= 1
    if i == 0:
        return True
    if text[i - 1] in "?!:;":
        return True
    if text[i - 1] == ".":
        # the letters and dots before the dot ("e.g", "Dr", "U.S"), looked for backwards and only as far as an
        # abbreviation goes: a search over the text before each word was quadratic (a 2,000-character question
        # of a long run and many ". B" took seconds of the event loop)
        j = i - 1
        while j > 0 and i - 1 - j <= _ABBREVIATION_MAX and (text[j - 1] in _ABBREVIATION_CHARS):
            j -= 1
        word = text[j:i - 1]
        if i - 1 - j > _ABBREVIATION_MAX:  # longer than any abbreviation: a word ends the sentence
            return True
        return not (word and (word.lower() in _ABBREVIATIONS or len(word) == 1))
    return False


def _is_name(token: str, sentence_start: bool) -> bool:
    """A proper name, acronym or versioned name: capitals inside ("RoPE", "FIFA"), a capitalized name with a
    number ("GPT-2"), or a capitalized word that does not open a sentence ("Ethereum", "Hamilton's") and is
    not an everyday word ("What", "World")."""
    letters = re.sub(r"[^A-Za-z]", "", token)
    if len(letters) + sum(c.isdigit() for c in token) < MIN_NAME_LEN or not letters or not token[0].isupper():
        return False
    if _base(token) in SELF_NAMES or re.match(r"I'[a-z]", token):  # "Tutor", "I've", "I'll"
        return False
    if token.isupper() and len(letters) > SHOUTED_MIN_LEN and not any(c.isdigit() for c in token) \
            and zipf_frequency(_base(token), "en") >= SHOUTED_ZIPF:
        return False  # an everyday word in capitals ("HONESTLY"), not an acronym
    if sum(c.isupper() for c in token) >= 2 or any(c.isdigit() for c in token):
        return True
    return not sentence_start and zipf_frequency(_base(token), "en") < COMMON_ZIPF


def candidates(question: str) -> tuple[list[str], list[str]]:
    """(names, rare words) of the question, as typed (accents folded, @mentions left out); see `forms` for how
    each is looked up."""
    text = _MENTION.sub(" ", fold(question))
    worded = [t for t in _TOKEN.findall(text) if re.search(r"[A-Za-z]{2}", t)]
    if len(worded) >= 3 and sum(t.isupper() for t in worded) >= 0.6 * len(worded):
        # caps lock: no word of it is a name by its capitals (every one was, and declined), but a versioned name
        # still is ("GPT-4"); the rest are left to the rare-word check
        text = "".join(t if re.search(r"\d", t) and re.search(r"[A-Za-z]", t) else t.lower()
                       for t in re.split(r"([A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*)", text))
    names, rare = [], []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if _is_name(tok, opens_sentence(text, m.start())):
            number = re.match(r" (\d+)\b(?![.,]\d)", text[m.end():])
            # "SHA 256": an acronym's version, said together by the course ("sha256"); a short one only ("ASCII
            # 128" is ASCII and a number) and only an acronym ("Row 2" is a row, said "row")
            acronym = sum(c.isupper() for c in tok) >= 2 and len(tok) <= 4 and not re.search(r"\d", tok)
            names.append(f"{tok} {number.group(1)}" if number and acronym else tok)
        elif re.fullmatch(r"[A-Za-z'-]+", tok) and _base(tok) not in SELF_NAMES \
                and zipf_frequency(_base(tok), "en") < RARE_ZIPF:
            rare.append(tok)
    return list(dict.fromkeys(names)), list(dict.fromkeys(rare))


JOIN_MIN_LEN, JOIN_MAX_ZIPF = 3, 5.5  # a word joined with its neighbour: both this long, neither this common


def _joined(question: str, words: list[str]) -> dict[str, list[str]]:
    """For each of `words`, the question's word before and after it joined to it, as one word and hyphenated: "Soft
    Max" is the course's "softmax", "Block Chain" its "blockchain" (each half was taken for a name the course never
    says, and declined)."""
    tokens = _TOKEN.findall(_MENTION.sub(" ", fold(question)))
    wanted, out = set(words), {}
    for a, b in zip(tokens, tokens[1:]):
        # (review: not with a short or function word, "a Theist" is no "atheist", "The Rapy" no "therapy")
        if not (a.isalpha() and b.isalpha()) or any(len(w) < JOIN_MIN_LEN or zipf_frequency(w.lower(), "en")
                                                    >= JOIN_MAX_ZIPF for w in (a, b)):
            continue
        pair = [f"{a}{b}".lower(), f"{a}-{b}".lower()]
        for w in (a, b):
            if w in wanted:
                out.setdefault(w, []).extend(pair)
    return out


def lookup_words(question: str) -> list[str]:
    """Every spelling the judge needs to look up in the course's words."""
    names, rare = candidates(question)
    joined = _joined(question, names + rare)
    # and a lower-case word with a number ("gpt3"): said otherwise by the course ("GPT-3"), its lexeme is no absence
    numbered = [t for t in _TOKEN.findall(_MENTION.sub(" ", fold(question))) if re.search(r"[a-z]\d|\d[a-z]", t)]
    return sorted({f for w in names + rare + numbered for f in forms(w)} | {j for js in joined.values() for j in js})


def uncovered(question: str, present: set[str]) -> tuple[list[str], list[str]]:
    """(names, rare words) of the question that the course never says in any form. A hyphenated name counts as
    said when the course says it whole ("sexy-son"); its parts alone do not cover it ("Hardy-Weinberg"). A word
    the course says joined with its neighbour counts as said ("Soft Max": "softmax")."""
    names, rare = candidates(question)
    joined = _joined(question, names + rare)
    missing = lambda w: not any(f in present for f in forms(w)) and not any(  # noqa: E731
        j in present for j in joined.get(w, ()))
    return [w for w in names if missing(w)], [w for w in rare if missing(w)]


def missing_rare_words(question: str, missing_lexemes: list[str], present_words: set[str] | None = None) -> list[str]:
    """Question words whose stem is absent from the course and that are rare in general English (accents folded,
    as the lexemes are: "Schrödinger" is "schrodinger"). A lexeme the course says in another form (`present_words`)
    is not absent: "GPT3" is the course's "GPT-3" (its lexeme "gpt3" was, and "GPT3" declined as "gpt")."""
    missing = {m for m in missing_lexemes if not (present_words and any(f in present_words for f in forms(m)))}
    out = []
    for word in re.findall(r"[A-Za-z][A-Za-z\-']{2,}", fold(question)):
        lw = word.lower()
        if any(lw.startswith(m) or m.startswith(lw[:5]) for m in missing) and zipf_frequency(lw, "en") < RARE_ZIPF:
            out.append(lw)
    return out


# a message asking or requesting something, wherever the words stand ("thanks, explain the mask", "hi, I don't
# understand hashing", "thanks! but I am confused about ...", "nice. Next: proof of stake.")
_REQUEST = re.compile(r"\b(?:explain|tell|show|define|describe|give|compare|list|summari[sz]e|clarify|elaborate|"
                      r"repeat|continue|more|what|why|how|when|where|which|who|whose|can|could|would|understand|"
                      r"confused|confusing|question|questions|stuck|wonder|wondering|mean|means|difference|"
                      r"help me)\b", re.I)
# chat words a reaction may hold besides its courtesies ("thanks, that helps", "ok, makes sense now")
_CHAT = frozenset(terms("help helps helped helpful brb later now sense makes clear understood sounds gotta run "
                        "class break lunch soon bit getting grabbing going"))
_COURTESY_TERMS = frozenset(terms(" ".join(SMALL_TALK | REPLIES)))
_CHECKING = re.compile(r"\bso\b|\b(?:then|right|correct)\W*$")
_CLAIM = re.compile(r"([^\W\d_]+)\s+(?:is|are|was|were|isn't|aren't|means|does|doesn't|works|has|can|cannot|can't)\b")
REACTION_MAX_TERMS = 1  # a reaction's other content words ("brb getting coffee"); more is something to say


def reaction(text: str) -> bool:
    """Chat reacting to what was said ("thanks, that helps", "ok cool", "thanks, brb getting coffee", "good night
    everyone"): it opens with a courtesy or a reply word, holds a courtesy, asks and requests nothing, names nothing
    and says little else. It asks the course nothing and is no topic for what follows (answered, it cited the
    lecture's "Thank you."; a later "and why is it one-way?" was searched with its words and cited another
    lecture)."""
    folded = _MENTION.sub(" ", fold(text))
    words = re.findall(r"[^\W\d_]+", folded.lower())
    if not (words and words[0] in SMALL_TALK | REPLIES and any(w in SMALL_TALK for w in words)) or "?" in text \
            or _REQUEST.search(folded):
        return False
    said = {t for t in terms(folded) if t not in _CHAT and t not in _COURTESY_TERMS}
    # (what goes on with a topic says more: "thanks, and the attention mask", "nice. Next: proof of stake.")
    named = [n for n in candidates(text)[0] if zipf_frequency(_base(n), "en") < SHOUTED_ZIPF]  # ("thanks Professor")
    # a word of it said to be something, "so" before it or "then" / "right" at the end, checks an understanding
    # ("cool, so hashing is one-way then"): a question ("thanks, the explanation is clear now" is no check: review)
    lowered = folded.lower()
    claims = bool(_CHECKING.search(lowered)) and any(said.intersection(terms(m.group(1)))
                                                      for m in _CLAIM.finditer(lowered))
    return len(said) <= REACTION_MAX_TERMS and not named and not claims


# a question about now ("what time is it?", "what's today's date?", "what day is it today?"): no course holds the
# answer, and searched it cited a lecture's "it's time to..."
_NOW = re.compile(r"(?:(?:hi|hey|hello|so|ok|okay|um|sorry|excuse me)[,!.]?\s+)*(?:do you know |can you tell me )?"
                  r"(?:what(?:'s| is)?|whats) (?:(?:the (?:time|date|day)|today'?s date)(?: (?:is it|it is|of the week"
                  r"|today|now|right now|here|there))*|(?:time|day)(?: (?:is it|it is|of the week|today|now|right now))+)"
                  r"(?:,? please)?\s*[?.!]*")  # (review: not "what is time?", nor "what day?" going on with a question)


def _now(question: str) -> re.Match | None:
    return _NOW.fullmatch(" ".join(_MENTION.sub(" ", fold(question)).lower().replace("’", "'").split()))


def asks_the_time(question: str) -> bool:
    """Whether the question asks for the time or the date, and nothing else ("what time is it?")."""
    return _now(question) is not None


def small_talk(question: str, standalone: str | None = None) -> bool:
    """Whether the question is only greetings and courtesies (no topic to look for), or asks for the time or the
    date; with replies among them ("yes", "again please"), only when the condensed `standalone` borrowed nothing
    from the conversation."""
    plain = _MENTION.sub(" ", fold(question)).lower()
    now = _now(question)
    if now:  # the time is the clock's, always (after a turn it was answered as the turn: tester); "what is the
        # date?" after a question goes on with it ("when was the paper published?")
        return "time" in now.group(0) or _borrowed_nothing(question, standalone)
    words = set(re.findall(r"[^\W\d_]+", plain))
    if not words or not words <= SMALL_TALK | REPLIES:
        return False
    return not words & REPLIES or _borrowed_nothing(question, standalone)


def _borrowed_nothing(question: str, standalone: str | None) -> bool:
    """Whether the condensed question is the question itself (None: not condensed)."""
    return standalone is None or " ".join(standalone.split()) == " ".join(question.split())


def _dense(hit: Any) -> float:
    """A hit's cosine on MiniLM's scale, which MIN_DENSE is set on (an ensemble's hits carry their primary's)."""
    primary = getattr(hit, "primary_dense", None)
    return float(primary if primary is not None else hit.dense_score or 0.0)


def shares_a_word(standalone: str, sources: list) -> bool:  # type: ignore[type-arg]
    """Whether a source says one of the question's content words (stemmed; `evidence.terms`). A question with none
    (another script than Latin: `terms` reads ASCII words only) is not held to it."""
    asked = set(terms(standalone))
    return not asked or any(asked.intersection(terms(getattr(s, "text", ""))) for s in sources)


TYPO_MIN_LEN = 5  # a word this long or longer may be a misspelling of a course word one edit away (two from 9
TYPO_TWO_EDITS_LEN = 9  # letters): "signiture", "funtion", "blockchian", "atention", "selction", "collumn"
TYPO_MAX_ZIPF = 1.5  # ... when it is no established word itself: typos sit at zipf 0-1.4, while "halving" (not the
# course's "having"), "staking" ("shaking"), "nonce" ("none") or "encoder" ("encoded") are words of their own
TYPO_MAX_WORDS = 5  # words looked at (the judge declines for the first it cannot place)


def declined_words(question: str, missing_lexemes: list[str], present_words: set[str] | None) -> list[str]:
    """The question's words (lower case) the judge would decline it for (names and rare words the course never
    says), long enough to be misspellings: the ones to look for near spellings of."""
    names, unsaid = uncovered(question, present_words) if present_words is not None else ([], [])
    words = [w for w in names + unsaid + missing_rare_words(question, missing_lexemes, present_words) if " " not in w]
    out = sorted({_base(w) for w in words if len(_base(w)) >= TYPO_MIN_LEN and _base(w).isalpha()
                  and zipf_frequency(_base(w), "en") < TYPO_MAX_ZIPF})
    return out if len(out) <= TYPO_MAX_WORDS else []  # (more: a question of made-up words, declined as it is)


def _edits_within(a: str, b: str, k: int) -> bool:
    """Whether `a` becomes `b` in at most `k` insertions, deletions, substitutions or swaps of neighbours."""
    if abs(len(a) - len(b)) > k:
        return False
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > k:
            return False
        prev2, prev = prev, cur
    return prev[-1] <= k


def corrected(text: str, near: dict[str, str]) -> str:
    """`text` with each misspelt word (`near_spellings`) replaced by the course's spelling, to search and judge."""
    if not near:
        return text
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(near, key=len, reverse=True)) + r")\b", re.I)
    return pattern.sub(lambda m: near[m.group(1).lower()], text)


def near_spellings(words: list[str], course_words: list[str]) -> dict[str, str]:
    """For each of `words`, a word the course says that it is a misspelling of (one edit away, two from
    TYPO_TWO_EDITS_LEN letters; the same first letter), if any: the question is searched and judged with the
    course's spelling (a single typo was told "the course videos don't cover this", the nearest moments right)."""
    out = {}
    for w in words:
        k = 2 if len(w) >= TYPO_TWO_EDITS_LEN else 1
        near = [c for c in course_words if c[:1] == w[:1] and c != w and _edits_within(w, c, k)]
        if near:
            out[w] = min(near, key=lambda c: (abs(len(c) - len(w)), c))
    return out


def judge(question: str, standalone: str, hits: list, sources: list, missing_lexemes: list[str],  # type: ignore[type-arg]
          present_words: set[str] | None = None, near: dict[str, str] | None = None, *,
          checked: str | None = None) -> Verdict:
    """`checked`: the text whose names and rare words are held to the course (the question without what it says
    about the asker, or with the turn it goes on with; default the question). `present_words`: which of
    `lookup_words(checked)` the course says (None: not looked up). `near`: words of the question that are
    misspellings of the course's (`near_spellings`), not declined for."""
    if small_talk(question, standalone) or (reaction(question) and _borrowed_nothing(question, standalone)):
        return Verdict(False, {"small_talk": True})
    checked = checked or question
    top_dense = max((_dense(h) for h in hits), default=0.0)
    near = near or {}
    rare = [w for w in missing_rare_words(checked, missing_lexemes, present_words) if _base(w) not in near]
    names, unsaid = uncovered(checked, present_words) if present_words is not None else ([], [])
    names, unsaid = [w for w in names if _base(w) not in near], [w for w in unsaid if _base(w) not in near]
    unshared = top_dense < MIN_DENSE_UNSHARED and not shares_a_word(standalone, sources)
    grounded = bool(sources) and top_dense >= MIN_DENSE and not unshared and not rare and not names and not unsaid
    return Verdict(grounded, {"top_dense": round(top_dense, 3), "rare_missing": rare, "names_missing": names,
                              "words_missing": unsaid, "nothing_shared": unshared,
                              **({"misspelt": near} if near else {})})
