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


def _timing(line: str, lineno: int, is_last: bool) -> tuple[float, float | None] | None:
    """Parse "start --> end [settings]". The last timing line of a cut-off file may be partial."""
    left, _, right = line.partition("-->")
    tokens = right.split()
    try:
        start = _checked(left.strip(), lineno)
    except PermanentIngestError:
        if is_last:
            logger.info("dropping truncated last cue at line %d", lineno)
            return None
        raise
    if not tokens:
        return start, None  # missing end: derived from the next cue later
    try:
        end = _checked(tokens[0], lineno)  # anything after it is cue settings (align:start ...)
    except PermanentIngestError:
        if is_last:
            return start, None
        raise
    return start, end


def parse_blocks(text: str, *, vtt: bool) -> list[RawCue]:
    """Cues of an SRT or WebVTT document (already decoded, with "\\n" line endings)."""
    lines = text.split("\n")
    timing_rows = [i for i, line in enumerate(lines) if "-->" in line]
    last_timing = timing_rows[-1] if timing_rows else -1
    i = 0
    if vtt:
        # The header runs to the first blank line ("Kind: captions", "Language: en", ...).
        while i < len(lines) and lines[i].strip() and (i == 0 or "-->" not in lines[i]):
            i += 1
    cues: list[RawCue] = []
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        _read_block(lines, i, j, vtt, last_timing, cues)
        if len(cues) > MAX_CUES:
            raise PermanentIngestError(f"too many cues: more than {MAX_CUES}")
        i = j
    return cues


def _read_block(lines: list[str], i: int, j: int, vtt: bool, last_timing: int, cues: list[RawCue]) -> None:
    block = lines[i:j]
    first = block[0].strip()
    if vtt and first.split(" ", 1)[0].split("\t", 1)[0] in _VTT_SKIPPED_BLOCKS:
        return
    timings = [k for k, line in enumerate(block) if "-->" in line]
    if not timings:
        if len(block) == 1 and _INDEX.fullmatch(first):
            return  # a lone cue number
        if i > last_timing and _PARTIAL_TIMING.match(block[-1].strip()):
            return  # the file was cut inside the next cue's header
        if cues:
            cues[-1].lines.extend(block)  # SRT text with a blank line inside it
        return
    if timings[0] > 1 and cues:
        # Text that lost its blank line before the next cue: everything before the identifier.
        cues[-1].lines.extend(block[: timings[0] - 1])
    for n, k in enumerate(timings):
        stop = timings[n + 1] if n + 1 < len(timings) else len(block)
        text = block[k + 1 : stop]
        if n + 1 < len(timings) and text and _INDEX.fullmatch(text[-1].strip()):
            text = text[:-1]  # the next cue's number, when blank lines are missing
        parsed = _timing(block[k], i + k + 1, i + k == last_timing)
        if parsed is not None:
            cues.append(RawCue(parsed[0], parsed[1], text))
