"""Caption text cleaning: markup, HTML entities, sound tags and speaker labels.

Works one caption line at a time, because speaker labels and YouTube's rolling duplicates are
defined by line starts. The words a person said are kept; everything around them goes.
"""
from __future__ import annotations

import html
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from store.frames import CLINGING

logger = logging.getLogger(__name__)

# Karaoke timestamps (<00:00:01.000>), caption markup (<c>, <i>, <v Name>, <font color=..>, <lang en>, <ruby>)
# and ASS overrides ({\an8}). Only tags captions use: "a < b", "x<y and y>z" and "vector<int>" are what was said.
# A one-letter tag opening right after a letter or digit is code ("List<U>", "Foo<T>"), not markup, unless its
# closing tag follows ("is<i>really</i>"): pairs go first.
# (A pair's text does not run past another opening of its tag: a search from every opening to the line's end made
# a line of many unclosed tags quadratic; "<b>" * 8,000 took seconds. Nested same tags pair from the inside.)
_PAIRED = re.compile(r"<([bius])(?:\.[\w.-]*)?\s*>((?:(?!<\1[.\s>]).)*?)</\1\s*>", re.IGNORECASE)
_TAGS = re.compile(r"<\d{1,2}:\d{2}(?::\d{2})?(?:[.,]\d+)?>"
                   r"|(?<![^\W_])<(?:[bius])(?:\.[\w.-]*)?\s*/?>|</(?:[bius])\s*>"
                   r"|</?(?:c|ruby|rt|rp|sub|sup|br|em|strong)(?:\.[\w.-]*)?\s*/?>"  # WebVTT: classes only
                   r"|</?(?:v|lang|font|span)(?:[\s.][^<>]*)?>"  # with a name or attributes
                   r"|\{\\[^{}]*\}", re.IGNORECASE)
# A line break inside a cue is a space between words ("Hello<br>world"); a ruby's reading (<rt>, and <rp>'s
# fallback brackets) is not what the line says ("漢字<rt>かんじ</rt>" reads 漢字).
_BREAK = re.compile(r"<br(?:\.[\w.-]*)?\s*/?>", re.IGNORECASE)
_RUBY_TEXT = re.compile(r"<(rt|rp)(?:\.[\w.-]*)?\s*>.*?</\1\s*>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z]+\d*);")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_PARENTHESISED = re.compile(r"\(([^()]*)\)")
_WORD = re.compile(r"[A-Za-z]+")

# Words that make "[...]" or "(...)" a description of sound rather than speech. "[i]" (array
# index) or "(DNA)" must survive, so brackets need a sound word or ALL CAPS, parentheses a sound
# word or several ALL CAPS words.
SOUND_WORDS = frozenset(
    """music musical applause applauding laughter laughs laughing laugh chuckles chuckling
    chuckle inaudible unintelligible indistinct crosstalk silence silent noise noises cough coughs
    coughing sigh sighs sighing cheering cheers clapping claps squeaking squeaks rustling clicking
    clicks beep beeps beeping static whistling typing sniffs sniffing groans gasps murmuring
    chatter chattering foreign blank_audio""".split()
)

# A label is a line-initial name plus colon: "PROFESSOR:", "JUSTIN SOLOMON:", "Prof:",
# "Professor Paul Bloom:", "Speaker 2:". Mixed-case names need a role word first, so "Lakes:" or
# "So the idea is the following:" stay text.
_ROLES = (
    r"(?:Prof(?:essor)?|Dr|Mr|Mrs|Ms|Students?|Audience|Speaker|Instructor|Teacher|Lecturer|"
    r"Host|Narrator|Interviewer|Interviewee|Moderator|Panelist|Man|Woman|Male|Female|Participant)"
)
_LABEL = re.compile(
    r"^\s*(?:-\s+)?(?:"
    r"[A-Z][A-Z0-9.'\-]+(?:\s+[A-Z][A-Z0-9.'\-]*){0,3}"
    rf"|{_ROLES}\.?(?:\s+(?:[A-Z][\w'.\-]*|\d+)){{0,3}}"
    r")\s*:(?=\s|$)"
)
# Patterns with a leading run (white space, ">") start only where that run starts, as a search from each place
# inside it scanned to its end (a line of 20,000 spaces took seconds; the time grows with the square).
_RUN_START = r"(?:(?<!\s)\s++|(?<![\s>]))"
# (">> >>" is one match: a second run starts inside the first's match, where the run-start check cannot see it)
_CHEVRONS = re.compile(_RUN_START + r">{2,}+(?:\s*+>{2,}+)*+\s*+")
# A stray ">" left where "<inaudible>"-style markup was mangled: at either end of the line or just
# before punctuation. A ">" between two words is kept (it may be maths).
_LEADING_GT = re.compile(r"^[\s>]*>\s*")
_STRAY_GT = re.compile(_LEADING_GT.pattern + "|" + _RUN_START + r">++\s*+$|" + _RUN_START + r">++(?=[.,;:!?])")
_SPACES = re.compile(r"\s+")
_HAS_WORD = re.compile(r"\w")
# What Postgres text cannot hold (NUL), what no encoder takes (lone surrogates, e.g. from a JSON "\ud800"), and
# other control characters, C1 ones too (a terminal's CSI \x9b): never stored.
_UNSTORABLE = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")
# ... those of them that separate (vertical tab, form feed, the information separators, NEL) become a space; the
# others are dropped ("wor\x07ld" was two words).
_SEPARATING = re.compile(r"[\x0b\x0c\x1c-\x1f\x85]")
# Characters that send a line down the slow path; most caption lines contain none of them.
_SPECIAL = re.compile("[<>&\\[\\](){:♪♫\xa0\t\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff"
                      + CLINGING.pattern[1:-1] + "]")  # (and the marks CLINGING drops)


def _is_sound(inner: str, *, brackets: bool, shouting: bool = False) -> bool:
    words = _WORD.findall(inner)
    if not words:
        return False
    if any(w.lower() in SOUND_WORDS for w in words):
        return True
    if shouting and not brackets:  # in a transcript all in capitals, "(NAIVE BAYES)" is speech like the rest
        return False
    # "[? IS042 ?]", "[CB?]": a transcriber's uncertain guess at words, not a sound. A word of three letters or
    # more, as a description has ("[MUSIC]", "(CROWD CHEERING)"): "[H2O]", "[AB]", "P(A|B)", "f(X, Y)" are maths.
    shouting = (inner.upper() == inner and "?" not in inner and any(len(w) >= 3 for w in words))
    return shouting and (brackets or len(words) >= 2)


def _drop_sound_tags(line: str, shouting: bool = False) -> str:
    if "[" in line:
        line = _BRACKETED.sub(lambda m: " " if _is_sound(m.group(1), brackets=True) else m.group(0), line)
    if "(" in line:
        line = _PARENTHESISED.sub(
            lambda m: " " if _is_sound(m.group(1), brackets=False, shouting=shouting) else m.group(0), line
        )
    return line


def shouting(texts: Iterable[str], sample_chars: int = 200_000) -> bool:
    """Whether a transcript is written all in capitals (broadcast captions often are): there, a run of capitals
    before a colon or inside parentheses is no sign of a speaker label or a sound note. Judged on a sample."""
    upper = lower = seen = 0
    for text in texts:
        for ch in text[: sample_chars - seen]:
            if ch.isupper():
                upper += 1
            elif ch.islower():
                lower += 1
        seen += len(text)
        if seen >= sample_chars:
            break
    return upper >= 200 and lower <= upper // 50


def _unescape(line: str) -> str:
    # YouTube sometimes double-escapes ("&amp;#39;"); two passes undo that, more would be guessing.
    for _ in range(2):
        if not _ENTITY.search(line):
            break
        line = html.unescape(line)
    return line


def strip_speaker_label(line: str, keep: frozenset[str] = frozenset()) -> str:
    """Remove a leading speaker label ("PROF:", "Student:", "- JOHN SMITH:") and keep the words; a label in
    `keep` (see `word_labels_to_keep`) stays as text."""
    m = _LABEL.match(line)
    if m is None or (keep and _label_key(m) in keep):
        return line
    return line[m.end():]


_ROLE_WORD = re.compile(_ROLES + r"\.?", re.IGNORECASE)


def _label_key(m: re.Match[str]) -> str:
    return m.group(0).strip().lstrip("-").rstrip(":").strip()


def word_labels_to_keep(lines: Iterable[str], shouting: bool = False) -> frozenset[str]:
    """One ALL-CAPS word before a colon at a line's start ("DNA: the molecule", "NOTE: ...") is an acronym or a
    heading as often as a speaker ("BOB: hi"). In a transcript where no label comes back (one voice), such a
    word is kept as text; where some label occurs twice or more (a transcript that names its speakers), it is a
    label. Role words ("STUDENT:") and names of several words ("JOHN SMITH:") are labels either way; but in a
    transcript all in capitals (`shouting`) any run of words before a colon may be speech ("THE KEY IDEA IS:"):
    there one that does not come back is text unless a role word leads it. `lines`: the transcript's raw caption
    lines; each distinct line counts once (rolling captions show a line twice)."""
    counts: Counter[str] = Counter()
    for line in {_markup_off(x, shouting) for x in lines if ":" in x}:
        if ":" in line:
            for part in _CHEVRONS.split(line) if ">>" in line else (line,):
                m = _LABEL.match(part)
                if m is not None:
                    counts[_label_key(m)] += 1
    if shouting:
        return frozenset(k for k, n in counts.items() if n < 2 and not _ROLE_WORD.match(k))
    if not counts or max(counts.values()) >= 2:
        return frozenset()
    return frozenset(k for k in counts if " " not in k and k.isupper() and not _ROLE_WORD.fullmatch(k))


def is_plain(text: str) -> bool:
    """True when no line of `text` needs cleaning beyond strip() (true of most captions)."""
    return (
        bool(text)
        and text[0] not in "- "
        and "  " not in text
        and "\n-" not in text
        and "\n " not in text
        and not _SPECIAL.search(text)
        and _HAS_WORD.search(text) is not None
        # decomposed ("Cafe" + U+0301): composed by `clean_line` (kept as sent, transcripts and citations read NFD)
        and (text.isascii() or unicodedata.is_normalized("NFC", text))
    )


def _markup_off(line: str, shouting: bool = False) -> str:
    """A caption line without its markup, entities, invisible characters and sound tags (labels still on)."""
    if "<" in line or "{" in line:
        if "</" in line:
            line = _PAIRED.sub(r"\2", _RUBY_TEXT.sub("", line))
        line = _TAGS.sub("", _BREAK.sub(" ", line))
    if "&" in line:
        line = _unescape(line)
    line = CLINGING.sub("", line.replace("\xa0", " ").replace("♪", " ").replace("♫", " "))
    line = _UNSTORABLE.sub("", _SEPARATING.sub(" ", line))
    return _drop_sound_tags(line, shouting)


def clean_line(line: str, keep_labels: frozenset[str] = frozenset(), shouting: bool = False) -> str:
    """One caption line as plain spoken words; '' when nothing spoken is left. `keep_labels`: labels that are
    text in this transcript (`word_labels_to_keep`); `shouting`: the transcript is all in capitals (`shouting`).
    Composed (NFC), as questions are read: a decomposed "Й" lost its breve to search's accent folding."""
    if not line.isascii() and not unicodedata.is_normalized("NFC", line):
        line = unicodedata.normalize("NFC", line)
    if is_plain(line):
        return line.strip()
    line = _markup_off(line, shouting)
    if ">>" in line:
        # ">>" marks a change of speaker, and a label may follow it mid-line.
        line = _speaker_changes(line)
    else:
        line = strip_speaker_label(line, keep_labels)
    if ">" in line:
        # a ">" closing a "<" on the line is what was said ("vector<int>", "map<int, int>."); only a leading one goes
        line = (_LEADING_GT if "<" in line else _STRAY_GT).sub("", line)
    line = _SPACES.sub(" ", line).strip()
    return line if _HAS_WORD.search(line) else ""


# What a speaker change follows mid-line: the end of a sentence (or of a quote or bracket closing one).
_SAID_BEFORE = frozenset(".!?…:;,\"'”’)]")
_LABEL_AT = re.compile(_LABEL.pattern.removeprefix("^"))  # (matched at a position: `^` would not)
assert _LABEL_AT.pattern != _LABEL.pattern


def _speaker_changes(line: str) -> str:
    """The line without its speaker marks (">>", and a label after one). A ">>" between two words that no
    sentence end comes before and no label follows is what was said: a shift or a stream in code ("cin >> x",
    "x >> 2"). (A mark's match takes the white space around it: the characters beside it are not white space.)"""
    out, last = [], 0
    for m in _CHEVRONS.finditer(line):
        start, end = m.start(), m.end()
        if (start > last and line[start - 1] not in _SAID_BEFORE and end < len(line)
                and not _LABEL_AT.match(line, end)):
            continue  # text: it stays where it is, and the next mark cuts after it
        out.append(strip_speaker_label(line[last:m.start()]))
        last = m.end()
    out.append(strip_speaker_label(line[last:]))
    return " ".join(out)


def join_lines(lines: list[str], shouting: bool = False) -> str:
    """Cleaned lines of one cue as one line, minus sound tags broken across lines ("[SOUND" / "OFF]")."""
    text = " ".join(lines)
    if ("[" in text or "(" in text) and len(lines) > 1:
        text = _SPACES.sub(" ", _drop_sound_tags(text, shouting)).strip()
        return text if _HAS_WORD.search(text) else ""
    return text


def clean_text(text: str) -> str:
    """Multi-line caption text as one cleaned line."""
    return join_lines([c for c in (clean_line(part) for part in text.split("\n")) if c])
