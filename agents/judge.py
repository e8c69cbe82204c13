"""Does the retrieved evidence answer the question? An offline judge from retrieval and vocabulary signals.

Declines when
- the best evidence is far from the question (nothing in the course is about it), or
- the question names something the course never says: a proper name or acronym ("Ethereum", "RoPE", "GPT-2")
  that no video mentions, in any form, or
- the question hinges on a term that is rare in general English and that no video uses, spoken or stemmed
  ("eigenvalues" when the course never says it).

The names and terms are checked against the words the course's transcripts actually use (store: video_words,
course_term_df), so the judge needs no list of topics and nothing about the questions it will be asked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from wordfreq import zipf_frequency

MIN_DENSE = 0.25  # cosine of the best chunk; below this nothing in the course is about the question
RARE_ZIPF = 3.0  # rarer than once per million words of English (zipf 3) and absent from the course: uncovered
MIN_NAME_LEN = 3  # shorter capitalized tokens are notation ("Ax", "Mr") more often than names

# the tokenization of store/videos.py WORD_RE, on the question's original case
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_SENTENCE_END = re.compile(r"[.?!:;]\s*$")


@dataclass
class Verdict:
    grounded: bool
    details: dict = field(default_factory=dict)


def _base(word: str) -> str:
    w = word.lower().replace("’", "'")
    return w[:-2] if w.endswith("'s") else w


def forms(word: str) -> list[str]:
    """The spellings that count as the course saying `word`: itself, singular/plural, with or without a
    possessive."""
    w = _base(word)
    out = [w, w + "'s", w + "s", w + "es"]
    if w.endswith("es") and len(w) > 4:
        out.append(w[:-2])
    if w.endswith("s") and len(w) > 3:
        out.append(w[:-1])
    return list(dict.fromkeys(out))


def _is_name(token: str, sentence_start: bool) -> bool:
    """A proper name, acronym or versioned name: capitals inside ("RoPE", "FIFA"), letters with digits ("GPT-2"),
    or a capitalized word that does not open a sentence ("Ethereum", "Hamilton's")."""
    letters = re.sub(r"[^A-Za-z]", "", token)
    if len(letters) + sum(c.isdigit() for c in token) < MIN_NAME_LEN or not letters:
        return False
    if sum(c.isupper() for c in token) >= 2 or (any(c.isdigit() for c in token) and token[0].isalpha()):
        return True
    return token[0].isupper() and not sentence_start


def candidates(question: str) -> tuple[list[str], list[str]]:
    """(names, rare words) of the question, as typed; see `forms` for how each is looked up."""
    names, rare = [], []
    for m in _TOKEN.finditer(question):
        tok = m.group(0)
        start = m.start() == 0 or bool(_SENTENCE_END.search(question[:m.start()]))
        if _is_name(tok, start):
            names.append(tok)
        elif re.fullmatch(r"[A-Za-z'’-]+", tok) and zipf_frequency(_base(tok), "en") < RARE_ZIPF:
            rare.append(tok)
    return list(dict.fromkeys(names)), list(dict.fromkeys(rare))


def lookup_words(question: str) -> list[str]:
    """Every spelling the judge needs to look up in the course's words."""
    names, rare = candidates(question)
    return sorted({f for w in names + rare for f in forms(w)})


def uncovered(question: str, present: set[str]) -> tuple[list[str], list[str]]:
    """(names, rare words) of the question that the course never says in any form. A hyphenated name counts as
    said when the course says it whole ("sexy-son"); its parts alone do not cover it ("Hardy-Weinberg")."""
    names, rare = candidates(question)
    missing = lambda w: not any(f in present for f in forms(w))  # noqa: E731
    return [w for w in names if missing(w)], [w for w in rare if missing(w)]


def missing_rare_words(question: str, missing_lexemes: list[str]) -> list[str]:
    """Question words whose stem is absent from the course and that are rare in general English."""
    missing = set(missing_lexemes)
    out = []
    for word in re.findall(r"[A-Za-z][A-Za-z\-']{2,}", question):
        lw = word.lower()
        if any(lw.startswith(m) or m.startswith(lw[:5]) for m in missing) and zipf_frequency(lw, "en") < RARE_ZIPF:
            out.append(lw)
    return out


def judge(question: str, standalone: str, hits: list, sources: list, missing_lexemes: list[str],  # type: ignore[type-arg]
          present_words: set[str] | None = None) -> Verdict:
    """`present_words`: which of `lookup_words(question)` the course says (None: not looked up)."""
    top_dense = max(((h.dense_score or 0.0) for h in hits), default=0.0)
    rare = missing_rare_words(question, missing_lexemes)
    names, unsaid = uncovered(question, present_words) if present_words is not None else ([], [])
    grounded = bool(sources) and top_dense >= MIN_DENSE and not rare and not names and not unsaid
    return Verdict(grounded, {"top_dense": round(top_dense, 3), "rare_missing": rare, "names_missing": names,
                              "words_missing": unsaid})
