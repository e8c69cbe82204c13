"""Transcript files to clean, ordered cues: SRT, WebVTT and two JSON shapes, sniffed from content.

Limits (each rejected with a reason the instructor can act on): 50 MB per file, 200,000 cues,
timestamps up to 48 h.
"""
from __future__ import annotations

import codecs
import json
import logging
import math
import re

from ingest.cues import Cue, slowest_speaking_s
from ingest.errors import PermanentIngestError
from ingest.subtitles import MAX_CUES, MAX_TIMESTAMP_SECONDS, RawCue, parse_blocks
from ingest.textclean import clean_line, is_plain, join_lines, shouting, word_labels_to_keep

logger = logging.getLogger(__name__)

MAX_BYTES = 50 * 1024 * 1024

_TIMING_LINE = re.compile(r"^[ \t]*(?:\d+:)?\d{1,2}:\d{1,2}(?:[.,]\d+)?[ \t]*-->", re.M)
_WS = re.compile(r"\s*")
_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]{1,3}")
# Speech runs at ~2.5 words/s; used only to give a cue without an end time a plausible length.
_SECONDS_PER_WORD = 0.4
# A "word" longer than this (a pasted blob; far longer than a URL or a caption line of Chinese, which has no
# spaces) is broken into pieces of it, so chunks, which split between words, stay bounded.
MAX_WORD_CHARS = 1000
_LONG_WORD = re.compile(r"\S{%d,}" % (MAX_WORD_CHARS + 1))
_MIN_DERIVED, _MAX_DERIVED = 1.0, 10.0
# The last cue's end sets a transcript's video length: one shown far longer than its words take to say (a closing
# credit "to 23:59:59") is cut to what they take, at least this long.
_LONGEST_LAST_CUE_S = 30.0
ROLL_GAP_S = 2.0  # a cue repeating the one before starting later than this after it ended says it again


def _decode(data: bytes, strict: bool = True) -> str:
    """Text of a transcript file. `strict`: refuse (PermanentIngestError) a legacy file that is not Western."""
    if data.startswith(codecs.BOM_UTF8):
        text = data[3:].decode("utf-8", errors="replace")
    elif data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        text = data.decode("utf-32", errors="replace")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
    else:
        head = data[:400]
        if len(head) >= 8 and head.count(0) > len(head) // 3:
            # UTF-16 without a BOM: ASCII text has a zero in every other byte.
            le = head[1::2].count(0) > head[0::2].count(0)
            text = data.decode("utf-16-le" if le else "utf-16-be", errors="replace")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                # A few bad bytes in otherwise UTF-8 text (a cut-off head, a bad splice) stay UTF-8; mostly
                # bytes that are not UTF-8 means a legacy Windows subtitle file (whose "é’" or "«à" can look
                # like a UTF-8 sequence here and there, so one such pair does not make it UTF-8).
                good = len(_UTF8_SEQUENCE.findall(data))
                # (a character cut at the file's start or end is a cut, not another encoding)
                core = data.lstrip(bytes(range(0x80, 0xC0)))
                bad = codecs.getincrementaldecoder("utf-8")("replace").decode(core, final=False).count("\ufffd")
                if bad == 0 or good > 2 * bad:
                    text = data.decode("utf-8", errors="replace")
                else:
                    text = data.decode("cp1252", errors="replace")
                    if strict and _not_western(text):
                        raise PermanentIngestError(
                            "the file is neither UTF-8 nor Western (Windows-1252) text; save it as UTF-8")
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


# Central European and Turkish text in their legacy encodings (Windows-1250/1254, ISO-8859-2) read as Windows-1252:
# mostly ASCII, so under the accented-letter share, and stored garbled ("rozwi±zanie", "Øešení", "öðreneceðiz").
# What gives them away: a symbol between two letters (ą ł ż ź ś as ± ³ ¿ ¬ ¶, ¹); š or ž beside ř č ě ň ů as
# ø è ì ò ù (Czech, Slovak); ğ ş ı as ð þ ý without the á é í ó ú æ every Icelandic text has; Hungarian's ő ű as
# õ û among á é í ó ö ú ü and its small words ("az", "egy", "hogy"), without the letters that come with õ or û in
# a Western language (Portuguese ã ç ê, Estonian ä, French è à ç ê â î ô).
_SYMBOL_IN_WORD = re.compile(r"[^\W\d_][±³¿¬¶¼¹¾][^\W\d_]")
_CZECH_AS_WESTERN = re.compile(r"[øèìòùØÈÌÒÙ]")
_ICELANDIC = re.compile(r"[áéíóúæÁÉÍÓÚÆ]")
_HUNGARIAN_AS_WESTERN = re.compile(r"[õûÕÛ]")
_HUNGARIAN_VOWELS = re.compile(r"[áéíóöúüÁÉÍÓÖÚÜ]")
_WESTERN_WITH_TILDE_OR_CIRCUMFLEX = re.compile(r"[ãçêèàäâîôëïœÃÇÊÈÀÄÂÎÔËÏŒ]")
# ... and Hungarian's own small words, which a short French cue with é and û ("c'est sûr") lacks (review)
_HUNGARIAN_WORDS = re.compile(r"(?i)\b(?:az|egy|és|hogy|nem|vagy|csak|már|még|ez|ezt|azt|amely|amit)\b")


def _plus_minus(text: str, m: re.Match) -> bool:
    """Whether a ± between letters is the sign, beside a one-letter name ("-b±sqrt(D)", "p±q"), not a Polish ą read as
    Western (a Western transcript of a formula was refused)."""
    if m.group(0)[1] != "±":
        return False
    before = re.search(r"[^\W\d_]*$", text[:m.start() + 1]).group(0)
    after = re.match(r"[^\W\d_]*", text[m.end() - 1:]).group(0)
    return len(before) == 1 or len(after) == 1


def _not_western(text: str) -> bool:
    """Text decoded as Windows-1252 that was something else (Shift-JIS, GBK, Big5...): bytes Windows-1252 leaves
    undefined, or more accented letters than a Western language has; or a Central European or Turkish legacy
    encoding (see above)."""
    if "\ufffd" in text:
        return True
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) > 0.3 * len(letters):
        return True
    if any(not _plus_minus(text, m) for m in _SYMBOL_IN_WORD.finditer(text)):
        return True
    if any(c in text for c in "šžŠŽ") and _CZECH_AS_WESTERN.search(text):
        return True
    if (_HUNGARIAN_AS_WESTERN.search(text) and _HUNGARIAN_VOWELS.search(text)
            and not _WESTERN_WITH_TILDE_OR_CIRCUMFLEX.search(text) and _HUNGARIAN_WORDS.search(text)):
        return True
    return any(c in text for c in "ðþýÐÞÝ") and not _ICELANDIC.search(text)


def _first_json_item(text: str) -> object | None:
    """The first element of a JSON list, decoded alone so sniffing a big file stays cheap."""
    s = text.lstrip()
    if not s.startswith("["):
        return None
    i = _WS.match(s, 1).end()
    try:
        item, _ = json.JSONDecoder().raw_decode(s, i)
    except (json.JSONDecodeError, RecursionError, ValueError):  # nested too deep, a number too long
        return None
    return item


def _sniff(text: str) -> str | None:
    head = text.lstrip()
    if head.startswith("WEBVTT") and (len(head) == 6 or head[6] in " \t\n"):
        return "vtt"
    if head.startswith("["):
        item = _first_json_item(head)
        if isinstance(item, dict) and "text" in item and "start" in item:
            return "json_youtube"
        if isinstance(item, list) and len(item) >= 2 and isinstance(item[0], str):
            return "json_triples"
        return None
    # (binary, a video uploaded as captions, has no timing line either; a NUL alone does not make captions binary:
    # an SRT file with one, or padded with them, was "not a transcript" while WebVTT and JSON had theirs dropped)
    m = _TIMING_LINE.search(text, 0, 20_000)
    if m is None:
        return None
    before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
    # Headerless WebVTT has neither SRT's cue numbers nor its comma millis.
    return "srt" if before.isdigit() or "," in m.group(0) else "vtt"


def detect_transcript_format(data: bytes) -> str | None:
    """'srt', 'vtt', 'json_youtube', 'json_triples', or None; judged by content, not file name."""
    if not data.strip():
        return None
    return _sniff(_decode(data, strict=False))  # (what a file is; parsing it says what is wrong with it)


def _number(value: object, what: str, n: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PermanentIngestError(f"item {n}: {what} is not a number: {value!r:.40}")
    try:
        x = float(value)
    except (ValueError, OverflowError):  # (an integer of hundreds of digits overflows)
        raise PermanentIngestError(f"item {n}: {what} is not a number: {value!r:.40}") from None
    if not math.isfinite(x) or x < 0:
        raise PermanentIngestError(f"item {n}: {what} must be a non-negative number, got {value!r:.40}")
    if x > MAX_TIMESTAMP_SECONDS:
        raise PermanentIngestError(f"item {n}: {what} {x:.0f}s is past the 48 h limit")
    return round(x, 3)


def _json_items(text: str) -> list[object]:
    try:
        items = json.loads(text)
    except RecursionError:
        raise PermanentIngestError("not a transcript: JSON nested too deep") from None
    except json.JSONDecodeError as e:
        cut_short = e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())
        if not cut_short:
            raise PermanentIngestError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        # Cut off mid-file: keep every complete item before the cut.
        items, s, decoder = [], text.lstrip(), json.JSONDecoder()
        i = _WS.match(s, 1).end()
        while i < len(s) and s[i] != "]":
            try:
                item, i = decoder.raw_decode(s, i)
            except (json.JSONDecodeError, RecursionError, ValueError):
                break
            items.append(item)
            i = _WS.match(s, i).end()
            i = _WS.match(s, i + 1).end() if i < len(s) and s[i] == "," else i
        logger.info("JSON transcript is truncated; kept %d complete items", len(items))
    except ValueError as e:  # not JSONDecodeError: e.g. an integer of more than 4,300 digits
        raise PermanentIngestError(f"not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise PermanentIngestError("JSON is not a list of captions")
    if len(items) > MAX_CUES:
        raise PermanentIngestError(f"too many cues: more than {MAX_CUES}")
    return items


def _parse_json(text: str, fmt: str) -> list[RawCue]:
    cues = []
    for n, item in enumerate(_json_items(text), 1):
        if fmt == "json_youtube":
            if not isinstance(item, dict) or "start" not in item:
                raise PermanentIngestError(f"item {n}: expected {{\"text\", \"start\", \"duration\"}}")
            start = _number(item["start"], "start", n)
            if item.get("duration") is not None:
                end = round(start + _number(item["duration"], "duration", n), 3)
                if end > MAX_TIMESTAMP_SECONDS:
                    raise PermanentIngestError(f"item {n}: start + duration {end:.0f}s is past the 48 h limit")
            else:
                end = _number(item["end"], "end", n) if item.get("end") is not None else None
            words = item.get("text")
        else:
            if not isinstance(item, (list, tuple)) or len(item) < 2:
                raise PermanentIngestError(f"item {n}: expected [text, start_s, end_s]")
            start = _number(item[1], "start", n)
            end = _number(item[2], "end", n) if len(item) > 2 and item[2] is not None else None
            words = item[0]
        if words is not None and not isinstance(words, str):
            raise PermanentIngestError(f"item {n}: text is not a string: {words!r:.40}")
        cues.append(RawCue(start, end, words or ""))
    return cues


def _clean(raw: list[RawCue]) -> list[Cue]:
    cues: list[Cue] = []
    shown: list[str] = []  # the previous cue's lines, as displayed
    shown_until = -math.inf  # ...until then
    shown_from = -math.inf  # ...from then
    caps = shouting(rc.text for rc in raw)
    keep = word_labels_to_keep((line for rc in raw if ":" in rc.text for line in rc.text.split("\n")), caps)
    for rc in raw:
        if is_plain(rc.text):  # most cues: nothing to clean line by line
            text = rc.text
            lines = [x.strip() for x in text.split("\n")] if " \n" in text or text[-1] == " " else text.split("\n")
            if "" in lines:
                lines = [line for line in lines if line]
        else:
            lines = [c for c in (clean_line(line, keep, caps) for line in rc.text.split("\n")) if c]
        # YouTube auto-captions roll: each cue repeats the line before it, and a 10 ms cue repeats
        # the whole previous cue. Drop what is already on screen.
        # Only a cue that follows at once rolls: "No." said again a minute later is said again, and so is one a
        # file lists after a later cue (out of order: "Yes" at 1:00, then "Yes" at 0:01, is said twice).
        overlap = 0
        if shown and lines and lines[0] in shown and shown_from <= rc.start <= shown_until + ROLL_GAP_S:
            overlap = next((k for k in range(min(len(shown), len(lines)), 0, -1) if shown[-k:] == lines[:k]), 0)
        shown = lines
        shown_from, shown_until = rc.start, (rc.start if rc.end is None else max(rc.start, rc.end))
        if overlap == len(lines):
            last = cues[-1] if cues else None
            if lines and last and rc.end is not None and rc.start >= last.start and not rc.end <= last.end:
                last.end = rc.end
            continue
        text = lines[-1] if len(lines) - overlap == 1 else join_lines(lines[overlap:], caps)
        if len(text) > MAX_WORD_CHARS and _LONG_WORD.search(text):
            text = _LONG_WORD.sub(lambda m: " ".join(m[0][i:i + MAX_WORD_CHARS]
                                                     for i in range(0, len(m[0]), MAX_WORD_CHARS)), text)
        if text:
            end = rc.end if rc.end is not None and rc.end > rc.start else math.nan
            cues.append(Cue(rc.start, end, text))
    return cues


def clean_cues(cues: list[Cue]) -> list[Cue]:
    """Cues from elsewhere (YouTube captions, speech recognition) cleaned as an uploaded transcript's are (tags,
    sound notes such as [Music], speaker labels, rolled-up repeats, overlong words), then normalized. New cues."""
    return _normalize(_clean([RawCue(c.start, c.end, c.text) for c in cues]))


def normalize_cues(cues: list[Cue]) -> list[Cue]:
    """Sort, merge same-start cues, derive missing ends, clip overlaps: times strictly increase.

    Returns new cues; the input is left as it was.
    """
    return _normalize([Cue(c.start, c.end, c.text) for c in cues])


def _normalize(cues: list[Cue]) -> list[Cue]:
    starts = [c.start for c in cues]
    if any(a >= b for a, b in zip(starts, starts[1:])):
        cues = _merge_same_start(sorted(cues, key=lambda c: c.start))  # stable: file order kept
        starts = [c.start for c in cues]
    nexts = starts[1:] + [math.inf]
    # Only cues with a missing, backwards or overlapping end need fixing (nan fails every test).
    for c, nxt in zip(cues, nexts):
        if not c.start < c.end <= nxt:
            if not c.end > c.start:
                # Players show an open-ended cue until the next one; the last one gets reading time.
                guess = min(max(len(c.text.split()) * _SECONDS_PER_WORD, _MIN_DERIVED), _MAX_DERIVED)
                c.end = c.start + _MAX_DERIVED if nxt < math.inf else round(c.start + guess, 3)
            c.end = min(c.end, nxt)  # overlapping cues: the earlier one yields
    if cues:
        last = cues[-1]
        last.end = min(last.end, last.start + max(_LONGEST_LAST_CUE_S, slowest_speaking_s(last.text)))
    return cues


def _merge_same_start(cues: list[Cue]) -> list[Cue]:
    merged: list[Cue] = []
    for c in cues:
        if merged and c.start <= merged[-1].start:
            last = merged[-1]
            last.text = f"{last.text} {c.text}"
            if math.isnan(last.end) or c.end > last.end:
                last.end = c.end
        else:
            merged.append(c)
    return merged


def extension(filename: str | None) -> str:
    """The file name's extension, lower case, without the dot ("" for none)."""
    return filename.rsplit(".", 1)[-1].lower() if filename and "." in filename else ""


def parse_transcript(data: bytes, filename: str | None = None) -> list[Cue]:
    """Clean cues from an SRT, WebVTT or JSON transcript; PermanentIngestError when unreadable."""
    if len(data) > MAX_BYTES:
        raise PermanentIngestError(f"transcript too large: {len(data) // 2**20} MB (limit {MAX_BYTES // 2**20} MB)")
    if not data.strip():
        raise PermanentIngestError("not a transcript: the file is empty")
    text = _decode(data)
    fmt = _sniff(text)
    ext = extension(filename)
    if fmt is None:
        if text.lstrip().startswith(("[", "{")) or ext == "json":
            _json_items(text)  # a clear JSON syntax error beats a vague "unknown shape"
            raise PermanentIngestError(
                'not a transcript: JSON must be [{"text", "start", "duration"}, ...] or [[text, start_s, end_s], ...]'
            )
        if ext not in ("srt", "vtt") or "\x00" in text[:1000]:
            raise PermanentIngestError("not a transcript: expected SRT, WebVTT or JSON captions")
        fmt = ext  # named like captions; let the parser say what is wrong
    raw = _parse_json(text, fmt) if fmt.startswith("json") else parse_blocks(text, vtt=fmt == "vtt")
    cues = _normalize(_clean(raw))
    if not cues and raw:  # (cues there, each without a word: "♪", "😀", "∑ ∫ √")
        raise PermanentIngestError("no words to index: " + ("its one cue holds" if len(raw) == 1 else
                                                            f"its {len(raw)} cues hold")
                                   + " only sound tags, symbols or markup")
    if not cues:
        raise PermanentIngestError("not a transcript: no cues found")
    logger.debug("parsed %s transcript %s: %d cues", fmt, filename or "", len(cues))
    return cues
