"""Caption cues to timed sentences, and sentences to retrieval chunks that can cite their seconds.

Chunks follow sentence boundaries so a citation can point at the exact sentence, stay inside the
embedder's window (MiniLM truncates at 256 word-pieces) and never cover more than 90 s of video,
so "see 12:30" lands near what was said.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from ingest.cues import Cue

logger = logging.getLogger(__name__)

TOKENS_PER_WORD = 1.3  # word-pieces per English word, near enough for sizing
DEFAULT_TARGET_TOKENS = 180
DEFAULT_MAX_TOKENS = 240  # < 256 word-pieces, with room for [CLS]/[SEP] and estimate error
DEFAULT_OVERLAP_SENTENCES = 1
DEFAULT_MAX_SECONDS = 90.0
DEFAULT_SILENCE_SECONDS = 10.0

PAUSE_SECONDS = 1.5  # unpunctuated captions: a pause this long ends a sentence
SENTENCE_MAX_SECONDS = 30.0
# With punctuation, shorter pauses inside a sentence are thinking time, not an end.
_PUNCTUATED_PAUSE_SECONDS = 6.0
# Fewer sentence marks than one per this many words means auto-captions without punctuation.
_WORDS_PER_MARK = 60

_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs cf fig figs eq eqs approx".split())
_INITIALISM = re.compile(r"(?:[A-Za-z]\.){2,}$")  # e.g. i.e. U.S.


@dataclass(slots=True)
class Sentence:
    """One sentence (or sentence-sized piece) with the seconds it was spoken."""

    start: float
    end: float
    text: str


@dataclass(slots=True)
class Chunk:
    """Consecutive sentences embedded together; `sentences` lets an answer cite exact times."""

    position: int
    start: float
    end: float
    text: str
    sentences: list[Sentence]


def estimate_tokens(text: str) -> int:
    """Approximate embedder word-pieces in `text`."""
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def _ends_sentence(text: str, m: re.Match[str]) -> bool | None:
    """True/False for a mark inside `text`; None when a final "." depends on what comes next."""
    mark = m.group()
    if "?" in mark or "!" in mark or "…" in mark:
        return True
    word = text[text.rfind(" ", 0, m.start()) + 1 : m.start()]
    if word.lower().lstrip("(\"'") in _ABBREVIATIONS or _INITIALISM.search(word + "."):
        return False
    rest = text[m.end() :].lstrip()
    return None if not rest else not rest[0].islower()


def _fragments(cues: list[Cue]) -> list[tuple[float, float, str, bool | None]]:
    """Cue text cut at sentence marks; a cue's seconds shared out by character count."""
    out: list[tuple[float, float, str, bool | None]] = []
    floor = -math.inf
    for cue in cues:
        text = cue.text.strip()
        if not text:
            continue
        start = max(cue.start, floor)  # keeps times monotonic even for unsorted input
        end = max(cue.end, start)
        span, size, cut = end - start, len(text), 0
        verdict: bool | None = False
        for m in _BOUNDARY.finditer(text):
            ends = _ends_sentence(text, m)
            if m.end() == size:
                verdict = ends
            elif ends:
                t0, t1 = start + span * cut / size, start + span * m.end() / size
                out.append((t0, t1, text[cut : m.end()].strip(), True))
                cut = m.end()
        out.append((start + span * cut / size, end, text[cut:].strip(), verdict))
        floor = end
    return out


def split_sentence(s: Sentence, *, max_seconds: float, max_tokens: int | None = None) -> list[Sentence]:
    """Split an overlong sentence between words; times interpolated by character position."""
    words = s.text.split()
    n = max(1, math.ceil((s.end - s.start) / max_seconds))
    if max_tokens:
        n = max(n, math.ceil(estimate_tokens(s.text) / max_tokens))
    while True:
        n = min(n, len(words))
        pieces = _split_words(s, words, n)
        if n == len(words) or all(
            p.end - p.start <= max_seconds and (not max_tokens or estimate_tokens(p.text) <= max_tokens) for p in pieces
        ):
            break
        n += 1
    # A single word can't be split further; don't let it claim more than the limit.
    return [Sentence(p.start, min(p.end, p.start + max_seconds), p.text) for p in pieces]


def _split_words(s: Sentence, words: list[str], n: int) -> list[Sentence]:
    total = sum(len(w) + 1 for w in words)
    rate = (s.end - s.start) / total
    pieces, group, offset, group_start = [], [], 0, 0
    for w in words:
        group.append(w)
        offset += len(w) + 1
        if len(pieces) < n - 1 and offset >= total * (len(pieces) + 1) / n:
            pieces.append(Sentence(s.start + rate * group_start, s.start + rate * offset, " ".join(group)))
            group, group_start = [], offset
    if group:
        pieces.append(Sentence(s.start + rate * group_start, s.end, " ".join(group)))
    return pieces


def to_sentences(
    cues: list[Cue], *, pause_seconds: float = PAUSE_SECONDS, max_seconds: float = SENTENCE_MAX_SECONDS
) -> list[Sentence]:
    """Merge caption fragments into timed sentences, in time order.

    A sentence spanning cues runs from its first cue's start to its last cue's end; sentences
    sharing a cue split its time by character count. Without punctuation, pauses longer than
    `pause_seconds` end sentences; nothing runs longer than `max_seconds`.
    """
    frags = _fragments(cues)
    words = sum(f[2].count(" ") + 1 for f in frags)
    marks = sum(1 for f in frags if f[3] is not False)
    pause = pause_seconds if marks * _WORDS_PER_MARK < words else max(pause_seconds, _PUNCTUATED_PAUSE_SECONDS)
    sentences: list[Sentence] = []
    parts: list[str] = []
    cur_start = cur_end = 0.0

    def close() -> None:
        s = Sentence(cur_start, cur_end, " ".join(parts))
        sentences.extend(split_sentence(s, max_seconds=max_seconds) if cur_end - cur_start > max_seconds else [s])
        parts.clear()

    for i, (start, end, text, verdict) in enumerate(frags):
        if parts and (start - cur_end > pause or end - cur_start > max_seconds):
            close()
        if not parts:
            cur_start = start
        parts.append(text)
        cur_end = end
        if verdict is None:  # "...Dr." / "Nolen-Hoeksema": a lowercase start continues the sentence
            nxt = frags[i + 1][2] if i + 1 < len(frags) else ""
            verdict = not nxt[:1].islower()
        if verdict:
            close()
    if parts:
        close()
    return sentences


def chunk_sentences(
    sentences: list[Sentence],
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_sentences: int = DEFAULT_OVERLAP_SENTENCES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    silence_seconds: float = DEFAULT_SILENCE_SECONDS,
) -> list[Chunk]:
    """Pack time-ordered sentences into chunks of about `target_tokens`.

    Never more than `max_tokens` or `max_seconds` per chunk; the last `overlap_sentences` of a
    chunk open the next one; a silence over `silence_seconds` ends a chunk unless that leaves a
    tiny one.
    """
    if not 0 < target_tokens <= max_tokens or max_seconds <= 0 or overlap_sentences < 0:
        raise ValueError("need 0 < target_tokens <= max_tokens, max_seconds > 0, overlap_sentences >= 0")
    min_tokens = target_tokens // 3
    units: list[tuple[Sentence, int]] = []
    for s in sentences:
        tokens = estimate_tokens(s.text)
        if tokens > max_tokens or s.end - s.start > max_seconds:
            units.extend((p, estimate_tokens(p.text)) for p in split_sentence(s, max_seconds=max_seconds, max_tokens=max_tokens))
        elif tokens:
            units.append((s, tokens))

    chunks: list[Chunk] = []
    cur: list[tuple[Sentence, int]] = []
    carried = 0  # how many of `cur` repeat the end of the previous chunk

    def emit(keep_overlap: bool) -> None:
        nonlocal cur, carried
        if len(cur) > carried:
            ss = [s for s, _ in cur]
            chunks.append(Chunk(len(chunks), ss[0].start, ss[-1].end, " ".join(s.text for s in ss), ss))
            k = min(overlap_sentences, len(cur) - 1) if keep_overlap else 0
            cur = cur[len(cur) - k :] if k else []
        else:
            cur = []
        carried = len(cur)

    for s, tokens in units:
        if cur and s.start - cur[-1][0].end > silence_seconds:
            fresh = sum(t for _, t in cur[carried:])
            if fresh >= min_tokens:
                emit(keep_overlap=False)
            elif not fresh:
                cur, carried = [], 0  # no overlap across a long silence
        # Drop carried sentences, then close the chunk, until the new sentence fits.
        while cur and (sum(t for _, t in cur) + tokens > max_tokens or s.end - cur[0][0].start > max_seconds):
            if carried:
                cur.pop(0)
                carried -= 1
            else:
                emit(keep_overlap=True)
        cur.append((s, tokens))
        if sum(t for _, t in cur) >= target_tokens:
            emit(keep_overlap=True)

    if len(cur) > carried:
        fresh = cur[carried:]
        prev = chunks[-1] if chunks else None
        if (
            prev is not None
            and sum(t for _, t in fresh) < min_tokens
            and estimate_tokens(prev.text) + sum(t for _, t in fresh) <= max_tokens
            and fresh[-1][0].end - prev.start <= max_seconds
            and fresh[0][0].start - prev.end <= silence_seconds
        ):
            # A scrap at the end reads better inside the chunk before it.
            prev.sentences.extend(s for s, _ in fresh)
            prev.end = fresh[-1][0].end
            prev.text = " ".join(s.text for s in prev.sentences)
        else:
            emit(keep_overlap=False)
    return chunks
