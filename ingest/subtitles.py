"""SRT and WebVTT cue blocks: timestamps, headers, NOTE/STYLE/REGION blocks, truncated tails.

Both formats are "blocks separated by blank lines, each with an optional identifier, a timing line
and text", so one lenient scanner reads both. Text is returned raw; cleaning happens later.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ingest.errors import PermanentIngestError

logger = logging.getLogger(__name__)

MAX_CUES = 200_000  # ~55 h of one-second cues; more is not a lecture
MAX_TIMESTAMP_SECONDS = 48 * 3600.0

# [h:]mm:ss[.,]fff; hours optional (WebVTT), millis optional or short ("01,5"), comma or dot.
_TIMESTAMP = re.compile(r"(?:(\d{1,3}):)?(\d{1,2}):(\d{1,2})(?:[.,](\d{1,9}))?")
_CANONICAL = re.compile(r"(\d\d):([0-5]\d):([0-5]\d)[.,](\d\d\d)")
_INDEX = re.compile(r"\d+")
# A partial timing line at the very end of a cut-off file, e.g. "00:24:5" or "00:24:57,2".
_PARTIAL_TIMING = re.compile(r"\d{1,3}:[\d:.,]*(?:[ \t]+-{0,2})?")  # (all of the line: "1:1 exactly" is text)
# (a second "WEBVTT" header: HLS segment files joined into one)
_VTT_SKIPPED_BLOCKS = ("NOTE", "STYLE", "REGION", "WEBVTT")
# A WebVTT header inside the document: HLS segments joined into one file, each with its header (and maybe a BOM),
# without a blank line before it. It and the header lines after it (X-TIMESTAMP-MAP, Kind, Language) are no text.
_VTT_HEADER_LINE = re.compile(r"^\ufeff?WEBVTT(?:[ \t][^\n]*)?$", re.M)
_NEXT_LINE = re.compile(r"\s*([^\n]*)")  # from a position: the next line with something on it
_BLANKISH = re.compile(r"\n[ \t]+(?=\n)")  # whitespace-only lines end a block like empty ones
# The usual timing line, matched in one step: "00:00:01.000 --> 00:00:02.500 [settings]".
_CANONICAL_TIMING = re.compile(r"[ \t]*(\d\d:\d\d:\d\d[.,]\d\d\d)[ \t]+-->[ \t]+(\d\d:\d\d:\d\d[.,]\d\d\d)(?=[ \t]|$)[^\n]*", re.M)


@dataclass(slots=True)
class RawCue:
    """A cue as written in the file: end may be missing, text is raw and may span lines."""

    start: float
    end: float | None
    text: str


def parse_timestamp(token: str) -> float | None:
    """Seconds for an SRT/VTT timestamp, or None when it is not one."""
    m = _CANONICAL.fullmatch(token)
    if m is not None:  # nearly every timestamp: integer millis, then one exact division
        h, mi, sec, ms = m.groups()
        return (int(h) * 3_600_000 + int(mi) * 60_000 + int(sec) * 1000 + int(ms)) / 1000
    m = _TIMESTAMP.fullmatch(token)
    if m is None:
        return None
    hours, minutes, seconds, fraction = m.groups()
    if int(seconds) >= 60 or (hours is not None and int(minutes) >= 60):
        return None
    millis = (int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)) * 1000
    if fraction:
        millis += round(int(fraction) * 1000 / 10 ** len(fraction))
    return millis / 1000


class _BadTiming(Exception):
    def __init__(self, reason: str, start: float | None, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.start, self.fatal = reason, start, fatal


def _seconds(token: str, seen: dict[str, float], start: float | None = None) -> float:
    value = parse_timestamp(token)
    if value is None:
        raise _BadTiming(f"bad timestamp '{token[:40]}'", start)
    if value > MAX_TIMESTAMP_SECONDS:
        limit = MAX_TIMESTAMP_SECONDS / 3600
        raise _BadTiming(f"timestamp '{token}' is past the {limit:.0f} h limit", start, fatal=True)
    seen[token] = value
    return value


def _timing(line: str, seen: dict[str, float]) -> tuple[float, float | None]:
    """Parse "start --> end [cue settings]"; a missing end is None (derived later)."""
    left, _, right = line.partition("-->")
    left = left.strip()
    # `seen` caches parsed tokens: a cue's end is usually the next cue's start.
    start = seen.get(left)
    if start is None:
        start = _seconds(left, seen)
    tokens = right.split(None, 1)  # anything after the end time is cue settings (align:start ...)
    if not tokens:
        return start, None
    end = seen.get(tokens[0])
    return start, (_seconds(tokens[0], seen, start) if end is None else end)


_TIMESTAMP_LIKE = re.compile(r"-?\d+[:.,]\S*")  # (not "[\d:.,]*\S*": the same, with quadratic backtracking)


def _is_timing_line(line: str) -> bool:
    # "a --> b" and "2 --> 3 is the map" inside caption text are not timing lines (a timestamp has a separator);
    # "00:01:xx --> ..." and "00.00.03,000 --> ..." are broken ones (a 400 naming the line).
    s = line.lstrip()
    return "-->" in s and (s.startswith("-->") or _TIMESTAMP_LIKE.fullmatch(s.split("-->", 1)[0].strip()) is not None)


def _numbers_next(own: str, number: str) -> bool:
    """Whether `number` (a line of digits) can be the number of the cue after the one numbered `own`: a little
    above it (numbering may skip a few: an edited file). Digits compared as text past 18 of them."""
    if len(own) > 18 or len(number) > 18:
        return False
    return int(own) < int(number) <= int(own) + 5


class _Reader:
    """One pass over the blank-line-separated blocks of a document."""

    def __init__(self, text: str, vtt: bool) -> None:
        self.text, self.vtt = text, vtt
        self.seen: dict[str, float] = {}
        self.cues: list[RawCue] = []
        self.last_arrow = text.rfind("-->")  # no timing line starts after it
        # text of blocks without a timing line, per cue it continues: joined once at the end (appending to the
        # cue's text block after block copied it each time, quadratic in a long run of such blocks)
        self.more: dict[int, list[str]] = {}

    def timing(self, line: str, pos: int) -> tuple[float, float | None] | None:
        """Times of the timing line starting at character `pos`; None for a cut-off last cue."""
        try:
            return _timing(line, self.seen)
        except _BadTiming as e:
            if not e.fatal and not self.text[pos + len(line):].strip():
                # The file was cut inside its last timing line (nothing follows it): keep what parsed.
                logger.info("truncated last cue: %s", e.reason)
                return None if e.start is None else (e.start, None)
            raise PermanentIngestError(f"line {self.text.count(chr(10), 0, pos) + 1}: {e.reason}") from None

    def add(self, timing: tuple[float, float | None] | None, text: str) -> None:
        if timing is not None:
            self.cues.append(RawCue(timing[0], timing[1], text))

    def extend_last(self, lines: list[str]) -> None:
        if self.cues:
            self.more.setdefault(len(self.cues) - 1, []).append("\n".join(lines))

    def finish(self) -> list[RawCue]:
        for i, parts in self.more.items():
            self.cues[i].text = "\n".join([self.cues[i].text, *parts])
        self.more = {}
        return self.cues

    def numbers_a_cue(self, number: str, after: int) -> bool:
        """Whether a block of just `number`, ending at `after`, is a cue's number set apart from its timing line by a
        blank line (a cue follows), or the next cue's number at the end of a file cut short; else it is a paragraph
        of the last cue's text ("The answer is" / "42")."""
        line = _NEXT_LINE.match(self.text, after).group(1)  # (not a copy of the rest: quadratic over a long file)
        if line:
            return _is_timing_line(line)
        # the end of the file: the number after the last cue's own (the line above its timing line), if it has one
        arrow = self.text.rfind("-->", 0, after)
        timing_at = self.text.rfind("\n", 0, arrow) + 1 if arrow >= 0 else 0
        if timing_at > 0:
            ident = self.text[self.text.rfind("\n", 0, timing_at - 1) + 1:timing_at - 1].strip()
            if _INDEX.fullmatch(ident):
                return _numbers_next(ident, number)
        return _numbers_next(str(len(self.cues)), number) or _numbers_next(str(len(self.cues) - 1), number)

    def block(self, b: str, pos: int) -> None:
        """Any block: several cues without blank lines between, NOTE/STYLE, stray text."""
        lines = b.rstrip().split("\n")
        rows = [k for k, line in enumerate(lines) if _is_timing_line(line)]
        starts = [pos]
        for line in lines[:-1]:
            starts.append(starts[-1] + len(line) + 1)
        if not rows:
            head = lines[0].strip().lstrip("\ufeff")
            if self.vtt and head.split(" ", 1)[0].split("\t", 1)[0] in _VTT_SKIPPED_BLOCKS:
                return
            if len(lines) == 1 and _INDEX.fullmatch(head) and self.numbers_a_cue(head, pos + len(b)):
                return  # a lone cue number
            if _PARTIAL_TIMING.fullmatch(lines[-1].strip()) and self.last_arrow < pos:
                return  # the file was cut inside the last cue's header
            self.extend_last(lines)  # SRT text with a blank line inside it
            return
        if rows[0] > 1:
            self.extend_last(lines[: rows[0] - 1])  # text that lost its blank line
        for n, k in enumerate(rows):
            stop = rows[n + 1] if n + 1 < len(rows) else len(lines)
            text = lines[k + 1 : stop]
            own = lines[k - 1].strip() if k else ""
            if n + 1 < len(rows) and text and _INDEX.fullmatch(text[-1].strip()) and (
                    not _INDEX.fullmatch(own) or _numbers_next(own, text[-1].strip())):
                text = text[:-1]  # the next cue's number (when this cue has one, a number just after it)
            self.add(self.timing(lines[k], starts[k]), "\n".join(text))


def parse_blocks(text: str, *, vtt: bool) -> list[RawCue]:
    """Cues of an SRT or WebVTT document (decoded, "\\n" line endings); lines stay uncleaned.

    Everything before the first cue (the WEBVTT header, STYLE blocks) is skipped. A bad timestamp
    raises, except in the last timing line of a file that was cut short.
    """
    if text.count("-->") > MAX_CUES:
        raise PermanentIngestError(f"too many cues: more than {MAX_CUES}")
    text = _BLANKISH.sub("\n", text)  # keeps line numbers: only spaces go
    reader = _Reader(text, vtt)
    seen, cues = reader.seen, reader.cues
    pos = 0
    for b in text.split("\n\n"):
        here, pos = pos, pos + len(b) + 2
        if not b:
            continue
        if b[0] == "\n":
            stripped = b.lstrip("\n")
            here += len(b) - len(stripped)
            b = stripped
        # Fast path, nearly every block: "[identifier]\nhh:mm:ss.mmm --> hh:mm:ss.mmm\ntext...".
        if b.count("-->") == 1:
            m = _CANONICAL_TIMING.match(b)
            if m is None:
                nl = b.find("\n")
                m = _CANONICAL_TIMING.match(b, nl + 1) if nl > 0 else None
            if m is not None:
                first, last = m.groups()
                start, end = seen.get(first), seen.get(last)
                try:
                    if start is None:
                        start = _seconds(first, seen)
                    if end is None:
                        end = _seconds(last, seen, start)
                except _BadTiming:
                    reader.add(reader.timing(m.group(), here + m.start()), b[m.end() + 1 :])
                    continue
                cues.append(RawCue(start, end, b[m.end() + 1 :]))
                continue
        reader.block(b, here)
    cues = reader.finish()
    if vtt:
        for c in cues:
            if "WEBVTT" in c.text and (m := _VTT_HEADER_LINE.search(c.text)) is not None:
                c.text = c.text[:m.start()].rstrip("\n")
    return cues
