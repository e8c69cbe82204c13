"""Caption cues to timed sentences, and sentences to retrieval chunks that can cite their seconds.

Chunks follow sentence boundaries so a citation can point at the exact sentence, stay inside the
embedder's window (MiniLM truncates at 256 word-pieces) and never cover more than 90 s of video,
so "see 12:30" lands near what was said.
"""
from __future__ import annotations

import logging
import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from ingest.cues import CJK, Cue, slowest_speaking_s

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

_ABBREVIATIONS = "mr mrs ms dr prof sr jr st vs cf fig figs eq eqs approx".split()
# Where a sentence ends: after "?", "!" or "…" always (and the Devanagari danda, the Arabic question mark); after
# "." unless it closes an abbreviation ("Dr.", "e.g.", "U.S.") or the next word starts in lower case ("...and Dr."
# / "Nolen-Hoeksema", "18.06. ok"); after the full-width marks of Chinese and Japanese, which no space follows.
# Each branch starts with a literal so the scan over a whole lecture stays in C.
_SENTENCE_END = re.compile(
    r"(?:(?:!|\?|…|।|؟|\.(?![.!?…]*[\"'”’)\]]*\s+[a-zß-öø-ÿ])"
    + "".join(rf"(?<!\b(?i:{a})\.)" for a in _ABBREVIATIONS)
    + r"(?<!\.[A-Za-z]\.))[.!?…]*[\"'”’)\]]*(?=\s|$)"
    + r"|[。！？]+[」』”’）)\]]*)"
)


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


# Text without spaces between words: the embedder's tokenizer makes a word-piece of each Chinese, Japanese or
# Korean character, and several of a long run of letters (a pasted blob, Thai, a URL); counting words alone
# took a Chinese chunk for a few dozen pieces (it was ~390: a third of it never embedded).
LONG_WORD_CHARS = 32  # a "word" longer than this (a blob, a URL; no English word) is counted, and split, by characters
CHARS_PER_PIECE = 3  # word-pieces in a long run of letters: about one per three characters, or more
_LONG_OR_CJK = re.compile(r"\S{%d,}|%s" % (LONG_WORD_CHARS + 1, CJK.pattern))
# ASCII that words x TOKENS_PER_WORD undercounts: numbers and identifiers ("w100001" is three pieces, "3.14159" four)
# and code or formulas (each symbol a piece of its own): a transcript of them made chunks of 500+ pieces, twice the
# window. Such text is counted with the tokenizer.
_DENSE = re.compile(r"[0-9_=*/+<>\\^|~{}\[\]#$%&@]")


def estimate_tokens(text: str) -> int:
    """Embedder word-pieces in `text`: estimated for ASCII text of words (never fewer than words x TOKENS_PER_WORD),
    and counted with MiniLM's own tokenizer for any other, numbers and symbols included (never fewer than the
    estimate). MiniLM's vocabulary is
    English: a Russian, Greek, Arabic or Hebrew word is about one piece per letter, a German one about two
    and a half pieces, so an estimate by words let two thirds of a Russian chunk fall outside the window."""
    n = _estimate(text)
    if text.isascii() and not _DENSE.search(text):
        return n
    from agents.embedder import minilm_pieces

    return max(n, minilm_pieces(text))


def _estimate(text: str) -> int:
    if not _LONG_OR_CJK.search(text):
        return math.ceil(len(text.split()) * TOKENS_PER_WORD)
    n = 0.0
    for w in text.split():
        cjk = len(CJK.findall(w))
        rest = len(w) - cjk
        n += cjk + (0 if not rest else TOKENS_PER_WORD if rest <= LONG_WORD_CHARS else
                    max(TOKENS_PER_WORD, rest / CHARS_PER_PIECE))
    return math.ceil(n)


def _units(text: str) -> list[str]:
    """`text` cut where a split may fall, each piece with the space before it: between words, and inside a
    word with CJK characters or longer than LONG_WORD_CHARS (every LONG_WORD_CHARS characters)."""
    out: list[str] = []
    for m in re.finditer(r"\s*\S+", text):
        w = m.group(0)
        if len(w) <= LONG_WORD_CHARS or not _LONG_OR_CJK.search(w):
            out.append(w)
            continue
        lead = len(w) - len(w.lstrip())
        out.append(w[: lead + LONG_WORD_CHARS])
        out.extend(w[i: i + LONG_WORD_CHARS] for i in range(lead + LONG_WORD_CHARS, len(w), LONG_WORD_CHARS))
    return out


def split_sentence(s: Sentence, *, max_seconds: float, max_tokens: int | None = None) -> list[Sentence]:
    """Split an overlong sentence between words (inside a long word or a run of CJK characters where need be);
    times interpolated by character position."""
    words = _units(s.text)
    if len(words) < 2:
        return [Sentence(s.start, min(s.end, s.start + max_seconds), s.text)]
    # A few words shown for minutes (a cue held through a silent demo) were said near its start: spread evenly over
    # the cue they were cut into one-word pieces at made-up times. Longer than its words take, it is clipped first.
    said = max(max_seconds, slowest_speaking_s(s.text))
    if s.end - s.start > said:
        s = Sentence(s.start, s.start + said, s.text)
        if not max_tokens or estimate_tokens(s.text) <= max_tokens:
            if s.end - s.start <= max_seconds:
                return [s]
    n = max(1, math.ceil((s.end - s.start) / max_seconds))
    if max_tokens:
        n = max(n, math.ceil(estimate_tokens(s.text) / max_tokens))

    def split(k: int) -> tuple[bool, list[Sentence]]:
        pieces = _split_words(s, words, k)
        return k == len(words) or all(
            p.end - p.start <= max_seconds and (not max_tokens or estimate_tokens(p.text) <= max_tokens) for p in pieces
        ), pieces

    # The fewest pieces that fit: doubling, then bisecting (one cue of 200k words took minutes one piece at a time).
    low, high = n - 1, min(n, len(words))
    ok, pieces = split(high)
    while not ok:
        low, high = high, min(2 * high, len(words))
        ok, pieces = split(high)
    while high - low > 1:
        mid = (low + high) // 2
        fits, mid_pieces = split(mid)
        if fits:
            high, pieces = mid, mid_pieces
        else:
            low = mid
    # A single word can't be split further; don't let it claim more than the limit.
    return [Sentence(p.start, min(p.end, p.start + max_seconds), p.text) for p in pieces]


def _split_words(s: Sentence, words: list[str], n: int) -> list[Sentence]:
    """`words`: `_units` of the text (each with the space before it)."""
    total = sum(len(w) for w in words)
    rate = (s.end - s.start) / total

    def at(offset: int) -> float:
        return round(s.start + rate * offset, 3)

    pieces, group, offset, group_start = [], [], 0, 0
    for w in words:
        group.append(w)
        offset += len(w)
        if len(pieces) < n - 1 and offset >= total * (len(pieces) + 1) / n:
            pieces.append(Sentence(at(group_start), at(offset), "".join(group).strip()))
            group, group_start = [], offset
    if group:
        pieces.append(Sentence(at(group_start), s.end, "".join(group).strip()))
    return pieces


class _Timeline:
    """Cue texts laid end to end as one string, with each cue's character offset and seconds.

    Sentence ends are found by one regex over the whole string; a character offset maps back to
    seconds by interpolating inside its cue.
    """

    def __init__(self, cues: list[Cue], pause_seconds: float) -> None:
        texts = [c.text for c in cues]
        starts = [c.start for c in cues]
        ends = [c.end for c in cues]
        joined = " ".join(texts)
        tidy = (
            all(texts)
            and all(s < e for s, e in zip(starts, ends))
            and all(e <= s for e, s in zip(ends, starts[1:]))
            and not any(ws in joined for ws in ("\n", "\t", "  "))
            and not any(t[0] == " " or t[-1] == " " for t in texts)
        )
        if not tidy:  # unsorted, overlapping or messy cues (parse_transcript never gives these)
            texts, starts, ends = self._tidy(cues)
            joined = " ".join(texts)
        self.text = joined
        self.lengths = [len(t) for t in texts]
        self.offsets = [0, *accumulate(n + 1 for n in self.lengths)][:-1]
        self.starts, self.ends = starts, ends
        # (offset of a cue, silence before it), for silences long enough to matter
        self.gaps = [
            (self.offsets[i + 1], s - e) for i, (e, s) in enumerate(zip(ends, starts[1:])) if s - e > pause_seconds
        ]

    @staticmethod
    def _tidy(cues: list[Cue]) -> tuple[list[str], list[float], list[float]]:
        texts: list[str] = []
        starts: list[float] = []
        ends: list[float] = []
        floor = -math.inf
        for cue in cues:
            text = " ".join(cue.text.split())
            if text:
                start = cue.start if cue.start > floor else floor
                floor = cue.end if cue.end > start else start
                texts.append(text)
                starts.append(start)
                ends.append(floor)
        return texts, starts, ends

    def time(self, offset: int, cue: int) -> float:
        """Seconds at `offset` inside cue number `cue`, by character count."""
        start, end = self.starts[cue], self.ends[cue]
        if offset <= self.offsets[cue]:
            return start
        fraction = (offset - self.offsets[cue]) / self.lengths[cue]
        return end if fraction >= 1 else round(start + (end - start) * fraction, 3)

    def sentence(self, cut: int, end: int) -> Sentence | None:
        """Text between two cuts; it starts where the previous sentence stopped, or at its cue."""
        begin = cut + 1 if self.text[cut : cut + 1] == " " else cut
        if begin >= end:
            return None
        first, last = bisect_right(self.offsets, begin) - 1, bisect_right(self.offsets, end - 1) - 1
        start = self.time(cut if cut > self.offsets[first] else self.offsets[first], first)
        return Sentence(start, self.time(end, last), self.text[begin:end])

    def capped(self, cut: int, end: int, max_seconds: float) -> list[Sentence]:
        """A sentence longer than `max_seconds`, split at cue boundaries, then between words."""
        pieces: list[Sentence] = []
        lo = cut
        for k in range(bisect_right(self.offsets, cut + 1), bisect_right(self.offsets, end - 1)):
            boundary = self.offsets[k] - 1  # the space before cue k
            lo_time = self.time(lo, bisect_right(self.offsets, lo + 1) - 1)
            if boundary > lo and self.ends[k] - lo_time > max_seconds:
                piece = self.sentence(lo, boundary)
                pieces += [piece] if piece else []
                lo = boundary
        piece = self.sentence(lo, end)
        pieces += [piece] if piece else []
        out: list[Sentence] = []
        for piece in pieces:
            out += split_sentence(piece, max_seconds=max_seconds) if piece.end - piece.start > max_seconds else [piece]
        return out


def to_sentences(
    cues: list[Cue], *, pause_seconds: float = PAUSE_SECONDS, max_seconds: float = SENTENCE_MAX_SECONDS
) -> list[Sentence]:
    """Merge caption fragments into timed sentences, in time order.

    A sentence spanning cues runs from its first cue's start to its last cue's end; sentences
    sharing a cue split its time by character count. Without punctuation, pauses longer than
    `pause_seconds` end sentences; nothing runs longer than `max_seconds`.
    """
    line = _Timeline(cues, min(pause_seconds, _PUNCTUATED_PAUSE_SECONDS))
    text = line.text
    if not text:
        return []
    cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
    punctuated = len(cuts) * _WORDS_PER_MARK >= text.count(" ") + 1
    pause = max(pause_seconds, _PUNCTUATED_PAUSE_SECONDS) if punctuated else pause_seconds
    breaks = [offset - 1 for offset, gap in line.gaps if gap > pause]
    if breaks:
        cuts = sorted(set(cuts).union(breaks))
    if not cuts or cuts[-1] < len(text):
        cuts.append(len(text))
    sentences: list[Sentence] = []
    prev = 0
    for cut in cuts:
        s = line.sentence(prev, cut)
        if s is not None:
            if s.end - s.start > max_seconds:
                sentences += line.capped(prev, cut, max_seconds)
            else:
                sentences.append(s)
        prev = cut
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
        # Counting spaces is cheaper than estimate_tokens() and, for ASCII without long words, never smaller.
        tokens = 0 if not s.text or s.text.isspace() else math.ceil((s.text.count(" ") + 1) * TOKENS_PER_WORD) \
            if s.text.isascii() and not _LONG_OR_CJK.search(s.text) and not _DENSE.search(s.text) \
            else estimate_tokens(s.text)
        if tokens > max_tokens or s.end - s.start > max_seconds:
            pieces = split_sentence(s, max_seconds=max_seconds, max_tokens=max_tokens)
            units.extend((p, estimate_tokens(p.text)) for p in pieces)
        elif tokens:
            units.append((s, tokens))

    chunks: list[Chunk] = []
    cur: list[tuple[Sentence, int]] = []
    carried = 0  # how many of `cur` repeat the end of the previous chunk
    total = 0  # tokens in `cur`

    def emit(keep_overlap: bool) -> None:
        nonlocal cur, carried, total
        if len(cur) > carried:
            ss = [s for s, _ in cur]
            chunks.append(Chunk(len(chunks), ss[0].start, ss[-1].end, " ".join(s.text for s in ss), ss))
            k = min(overlap_sentences, len(cur) - 1) if keep_overlap else 0
            cur = cur[len(cur) - k :] if k else []
        else:
            cur = []
        carried = len(cur)
        total = sum(t for _, t in cur)

    for s, tokens in units:
        if cur and s.start - cur[-1][0].end > silence_seconds:
            fresh = total - sum(t for _, t in cur[:carried])
            if fresh >= min_tokens:
                emit(keep_overlap=False)
            elif not fresh:
                cur, carried, total = [], 0, 0  # no overlap across a long silence
        # Drop carried sentences, then close the chunk, until the new sentence fits.
        while cur and (total + tokens > max_tokens or s.end - cur[0][0].start > max_seconds):
            if carried:
                total -= cur.pop(0)[1]
                carried -= 1
            else:
                emit(keep_overlap=True)
        cur.append((s, tokens))
        total += tokens
        if total >= target_tokens:
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
