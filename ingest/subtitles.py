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
_INDEX = re.compile(r"\d+")
# A partial timing line at the very end of a cut-off file, e.g. "00:24:5" or "00:24:57,2".
_PARTIAL_TIMING = re.compile(r"\d{1,3}:\d")
_VTT_SKIPPED_BLOCKS = ("NOTE", "STYLE", "REGION")


@dataclass(slots=True)
class RawCue:
    """A cue as written in the file: end may be missing, lines are uncleaned."""

    start: float
    end: float | None
    lines: list[str]


def parse_timestamp(token: str) -> float | None:
    """Seconds for an SRT/VTT timestamp, or None when it is not one."""
    m = _TIMESTAMP.fullmatch(token)
    if m is None:
        return None
    hours, minutes, seconds, fraction = m.groups()
    if int(seconds) >= 60 or (hours is not None and int(minutes) >= 60):
        return None
    value = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    if fraction:
        value += int(fraction) / 10 ** len(fraction)
    return round(value, 3)


def _checked(token: str, lineno: int) -> float:
    value = parse_timestamp(token)
    if value is None:
        raise PermanentIngestError(f"line {lineno}: bad timestamp '{token[:40]}'")
    if value > MAX_TIMESTAMP_SECONDS:
        raise PermanentIngestError(
            f"line {lineno}: timestamp '{token}' is past the {MAX_TIMESTAMP_SECONDS / 3600:.0f} h limit"
        )
    return value


def _timing(
    line: str, lineno: int, is_last: bool, seen: dict[str, float]
) -> tuple[float, float | None] | None:
    """Parse "start --> end [settings]". The last timing line of a cut-off file may be partial."""
    left, _, right = line.partition("-->")
    left = left.strip()
    tokens = right.split(None, 1)
    try:
        start = seen.get(left)
        if start is None:
            start = seen[left] = _checked(left, lineno)
    except PermanentIngestError:
        if is_last:
            logger.info("dropping truncated last cue at line %d", lineno)
            return None
        raise
    if not tokens:
        return start, None  # missing end: derived from the next cue later
    try:
        end = seen.get(tokens[0])  # anything after it is cue settings (align:start ...)
        if end is None:
            end = seen[tokens[0]] = _checked(tokens[0], lineno)
    except PermanentIngestError:
        if is_last:
            return start, None
        raise
    return start, end


def parse_blocks(text: str, *, vtt: bool) -> list[RawCue]:
    """Cues of an SRT or WebVTT document (already decoded, with "\\n" line endings).

    Walks from timing line to timing line; what lies between is the cue's text, then blank lines
    and the next cue's identifier, or (rarely) NOTE blocks and stray text handled by `_extras`.
    """
    lines = text.split("\n")
    # A WebVTT header, NOTE or STYLE block may not contain "-->", so every such line is a cue's.
    rows = [i for i, line in enumerate(lines) if "-->" in line]
    if len(rows) > MAX_CUES:
        raise PermanentIngestError(f"too many cues: more than {MAX_CUES}")
    seconds: dict[str, float] = {}  # a cue's end is usually the next cue's start: parse once
    cues: list[RawCue] = []
    for k, row in enumerate(rows):
        nxt = rows[k + 1] if k + 1 < len(rows) else len(lines)
        timing = _timing(lines[row], row + 1, k + 1 == len(rows), seconds)
        body = lines[row + 1 : nxt]
        blank = next((b for b, line in enumerate(body) if not line.strip()), len(body))
        cue_lines, rest = body[:blank], body[blank:]
        if rest:
            identifier = nxt < len(lines) and bool(rest[-1].strip())
            if any(line.strip() for line in (rest[:-1] if identifier else rest)):
                _extras(rest, vtt, identifier, cue_lines)
        elif nxt < len(lines) and cue_lines and _INDEX.fullmatch(cue_lines[-1].strip()):
            cue_lines.pop()  # the next cue's number, when the blank line before it is missing
        if timing is not None:
            cues.append(RawCue(timing[0], timing[1], cue_lines))
    return cues


def _extras(rest: list[str], vtt: bool, identifier: bool, cue_lines: list[str]) -> None:
    """Blocks after a cue's text: skip NOTE/STYLE/REGION, numbers and cut-off timings; stray
    text (an SRT cue with a blank line inside) joins the cue above."""
    blocks: list[list[str]] = [[]]
    for line in rest:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    if identifier:
        blocks[-1].pop()  # the next cue's identifier, directly above its timing line
    for n, block in enumerate(blocks):
        head = block[0].strip() if block else ""
        if not block or (vtt and head.split(" ", 1)[0].split("\t", 1)[0] in _VTT_SKIPPED_BLOCKS):
            continue
        if len(block) == 1 and _INDEX.fullmatch(head):
            continue
        if n == len(blocks) - 1 and _PARTIAL_TIMING.match(block[-1].strip()):
            continue  # the file was cut inside the next cue's header
        cue_lines.extend(block)
