"""Evidence for the tutor: sentence windows from retrieved chunks, ranked, narrowed to citable moments.

Pure functions over search hits (store/search.py does the querying). A citation is a window of consecutive
sentences of one video, at most MAX_CITATION_S long, with a short quote.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from store.frames import mmss  # noqa: F401 - (agents import it from here)

MAX_CITATION_S = 60.0
QUOTE_CHARS = 240

_WORD = re.compile(r"[a-z0-9]+")
STOP = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers him his how i if in into is it its itself just let me more most my no nor not now of off on once only or
other our out over own same she should so some such than that the their them then there these they this those
through to too under until up very was we were what when where which while who whom why will with would you
your yours yourself going gonna really okay ok yeah like well um uh thing things kind sort lot get got say says
said see know think way one two just right actually mean means tell explain describe lecture video professor
""".split())


def stem(word: str) -> str:
    """A light suffix stripper: enough to match 'signatures' with 'signature', 'encoded' with 'encode'."""
    for suffix in ("ations", "ation", "ings", "ing", "edly", "ies", "ied", "ed", "es", "ly", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if suffix in ("ies", "ied"):
                word += "y"
            break
    return word


def terms(text: str) -> list[str]:
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOP and len(w) > 1]


@dataclass(slots=True)
class Window:
    """Consecutive sentences of one video: a candidate citation."""

    video_id: int
    video_title: str
    youtube_id: str | None
    start: float
    end: float
    text: str
    chunk_rank: int
    score: float = 0.0
    core: str = ""  # the best-matching sentence itself
    extra: dict = field(default_factory=dict)
    core_start: float | None = None  # when that sentence is said (the window starts a sentence or two before it)

    @property
    def quote_at(self) -> float:
        return self.start if self.core_start is None else self.core_start


def _sentences(hit) -> list[tuple[float, float, str]]:  # type: ignore[no-untyped-def]
    out = []
    for s in hit.sentences or []:
        start, end, text = float(s[0]), float(s[1]), str(s[2])
        out.append((start, end, text))
    return out or [(hit.start, hit.end, hit.text)]


def best_moment(query: str, hit) -> float:  # type: ignore[no-untyped-def]
    """Where in a search hit's chunk (up to 90 s) the query is: the start of its sentence sharing the most of the
    query's words, the earliest of equals; the chunk's start when none shares any (a match of meaning alone)."""
    want = set(terms(query))
    best, at = 0, float(hit.start)
    for start, _end, text in _sentences(hit):
        got = len(want & set(terms(text)))
        if got > best:
            best, at = got, start
    return at


def windows(hits: list, extra_hits: list | None = None, *, around: int = 1) -> list[Window]:  # type: ignore[type-arg]
    """One window per sentence of the hits: the sentence with `around` neighbours each side (within 60 s).

    `extra_hits` (neighbouring chunks) lend context sentences but are not candidates themselves.
    """
    by_video: dict[int, dict[float, tuple[float, float, str]]] = {}
    for h in list(hits) + list(extra_hits or []):
        for s in _sentences(h):
            by_video.setdefault(h.video_id, {})[s[0]] = s
    ordered = {v: sorted(d.values()) for v, d in by_video.items()}
    out: list[Window] = []
    seen: set[tuple[int, float]] = set()
    for rank, h in enumerate(hits):
        seq = ordered[h.video_id]
        index = {s[0]: i for i, s in enumerate(seq)}
        for s in _sentences(h):
            if (h.video_id, s[0]) in seen:
                continue
            seen.add((h.video_id, s[0]))
            i = index[s[0]]
            lo, hi = i, i
            for _ in range(around):
                if lo > 0 and seq[hi][1] - seq[lo - 1][0] <= MAX_CITATION_S:
                    lo -= 1
                if hi + 1 < len(seq) and seq[hi + 1][1] - seq[lo][0] <= MAX_CITATION_S:
                    hi += 1
            # A window does not end on a question the speaker asks: the answer that follows belongs to it.
            while seq[hi][2].rstrip().endswith("?") and hi + 1 < len(seq) and seq[hi + 1][1] - seq[lo][0] <= MAX_CITATION_S:
                hi += 1
            start, end = seq[lo][0], seq[hi][1]
            if end - start > MAX_CITATION_S:  # a single very long sentence: clip to the limit
                end = start + MAX_CITATION_S
            out.append(Window(video_id=h.video_id, video_title=h.video_title, youtube_id=h.youtube_id, start=start,
                              end=end, text=" ".join(x[2] for x in seq[lo: hi + 1]), chunk_rank=rank, core=s[2],
                              core_start=s[0]))
    return out


def rank_windows(question: str, wins: list[Window], hit_scores: list[float], *, lexical_weight: float = 0.5
                 ) -> list[Window]:
    """Score windows by their chunk's retrieval score and idf-weighted overlap with the question."""
    q = set(terms(question))
    if not wins:
        return []
    df: Counter = Counter()
    for w in wins:
        df.update(set(terms(w.text)))
    n = len(wins)
    idf = {t: math.log(1 + n / (1 + df[t])) for t in q}
    q_mass = sum(idf.values()) or 1.0
    top = max(hit_scores) if hit_scores else 1.0
    for w in wins:
        core_terms, ctx_terms = set(terms(w.core)), set(terms(w.text))
        lexical = (sum(idf[t] for t in q & core_terms) + 0.5 * sum(idf[t] for t in (q & ctx_terms) - core_terms)) / q_mass
        retrieval = (hit_scores[w.chunk_rank] / top) if top > 0 else 0.0
        w.score = (1 - lexical_weight) * retrieval + lexical_weight * lexical
        w.extra["lexical"] = lexical
    # On equal evidence the later moment first: a lecture states a problem before it answers it.
    return sorted(wins, key=lambda w: (-w.score, w.chunk_rank, -w.start))


def pick_citations(ranked: list[Window], k: int = 3) -> list[Window]:
    """The best windows, without two overlapping moments of the same video."""
    chosen: list[Window] = []
    for w in ranked:
        if any(c.video_id == w.video_id and w.start < c.end and c.start < w.end for c in chosen):
            continue
        chosen.append(w)
        if len(chosen) == k:
            break
    return chosen


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


