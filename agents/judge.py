"""Does the retrieved evidence answer the question? An offline judge from retrieval signals.

Declines when the best evidence is far from the question, or when the question hinges on a term that is rare
in general English and appears nowhere in the course (the course does not talk about it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from wordfreq import zipf_frequency

MIN_DENSE = 0.25  # cosine of the best chunk; below this nothing in the course is about the question
RARE_ZIPF = 2.85  # a word this rare in English, absent from the whole course, marks an uncovered topic


@dataclass
class Verdict:
    grounded: bool
    details: dict = field(default_factory=dict)


def missing_rare_words(question: str, missing_lexemes: list[str]) -> list[str]:
    """Question words whose stem is absent from the course and that are rare in general English."""
    missing = set(missing_lexemes)
    out = []
    for word in re.findall(r"[A-Za-z][A-Za-z\-']{2,}", question):
        lw = word.lower()
        if any(lw.startswith(m) or m.startswith(lw[:5]) for m in missing) and zipf_frequency(lw, "en") < RARE_ZIPF:
            out.append(lw)
    return out


def judge(question: str, standalone: str, hits: list, sources: list, missing_lexemes: list[str]) -> Verdict:  # type: ignore[type-arg]
    top_dense = max(((h.dense_score or 0.0) for h in hits), default=0.0)
    rare = missing_rare_words(question, missing_lexemes)
    grounded = bool(sources) and top_dense >= MIN_DENSE and not rare
    return Verdict(grounded, {"top_dense": round(top_dense, 3), "rare_missing": rare})
