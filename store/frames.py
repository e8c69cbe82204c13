"""Client → server websocket frames, as msgspec tagged-union Structs (server → client events: store/events.py).

Every frame is a JSON object with `type` and may carry `ref` (any short string), which an `error` reply echoes.
Unknown types, unknown fields and wrong field types are refused with `error {code: "bad_frame"}`.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta

Ref = Annotated[str, Meta(max_length=100)]
# One line without control characters, not empty (a name); `(?![\s\S])`: the very end (server.api.schemas).
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+(?![\s\S])"
# A client's id for a message (its retries send it again): one line of visible characters, not blank (one
# character at least that is neither a space nor an invisible mark: a zero-width space alone was taken).
CLIENT_MSG_ID = (r"^(?=[\s\S]*[^\s\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
                 r"\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000e0000-\U000e0fff])"
                 r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]+(?![\s\S])")
CLIENT_MSG_ID_RULE = "must be one line of visible characters, not blank"
ClientMsgId = Annotated[str, Meta(min_length=1, max_length=100, pattern=CLIENT_MSG_ID)]
Id = Annotated[int, Meta(ge=1, le=2**62)]


class Relay(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Whom a bot (a Discord or Whop bridge) posts a message for: the person's id on the other side (one line of
    visible characters, as a client_msg_id) and their display name there. Only bots relay."""

    id: ClientMsgId
    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=NO_CONTROL)]

    @property
    def key(self) -> str:
        """The id as stored and compared: trimmed and composed (" alice " and "alice" are one person)."""
        return unicodedata.normalize("NFC", self.id.strip())


def relay_key(relay: Relay | None) -> str | None:
    """Whom a relayed message is for, as stored (None: the bot's own message, or a person's)."""
    return None if relay is None else relay.key


class Frame(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    ref: Ref | None = None


class MessageSend(Frame, tag="message.send"):
    """Post a message. Sending the same `client_msg_id` again returns the same message, never a second one.
    `reply_to`: the id of an earlier message of this room that this one answers."""

    text: str
    client_msg_id: ClientMsgId | None = None
    reply_to: Id | None = None
    relay: Relay | None = None  # bots: the person the message is from (see Relay)


class MessageEdit(Frame, tag="message.edit"):
    """Change your own message."""

    id: Id
    text: str


class MessageDelete(Frame, tag="message.delete"):
    """Delete your own message; instructors and admins delete any."""

    id: Id


class Typing(Frame, tag="typing"):
    active: bool = True


class Resume(Frame, tag="resume"):
    """Restart the stream after `after_seq`: the server replies with `welcome`, then every event with a
    greater seq in order, then live events. Ignore sequenced events between sending this and that `welcome`."""

    after_seq: Annotated[int, Meta(ge=0, le=2**62)]  # (REST's bound on a seq: past 64 bits was taken)


class Ping(Frame, tag="ping"):
    pass


class PollVote(Frame, tag="poll.vote"):
    """Live rooms: vote for option index `option` (0-based); voting again changes the vote until the poll closes."""

    poll_id: Id
    option: Annotated[int, Meta(ge=0, le=1000)]


class TutorAsk(Frame, tag="tutor.ask"):
    """Ask the tutor in this room: the question is posted as your message and the tutor replies to it
    (`tutor.delta` events while it writes, then a `message.new` from the tutor). Same as `@tutor` in a message."""

    text: str
    client_msg_id: ClientMsgId | None = None
    relay: Relay | None = None  # bots: the person asking (see Relay)


ClientFrame = Union[MessageSend, MessageEdit, MessageDelete, Typing, Resume, Ping, PollVote, TutorAsk]

_decoder = msgspec.json.Decoder(ClientFrame)


class BadFrame(ValueError):
    """The frame is not JSON, has an unknown type, or a field of the wrong type."""


# `\u0000` not preceded by an escaping backslash: a NUL character, which Postgres text cannot hold.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


# Letters that render as nothing: Hangul fillers and the blank Braille pattern (used to post "empty" messages).
INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # letters that render as nothing


def as_read(text: str) -> str:
    """What a voter reads: composed (NFC), full-width Latin letters and digits folded ("Ｙes" is "Yes"), format
    characters (a zero-width space) and letters that render as nothing dropped, spacing and case ignored. Marks
    stay: in Thai, Arabic or Hindi they tell words apart; so do the zero-width (non-)joiners between two emoji or two
    letters of a joining script (a family emoji is not its three faces; Persian spells with the non-joiner)."""
    composed = unicodedata.normalize("NFC", text)
    folded = "".join(unicodedata.normalize("NFKC", c) if "\uff01" <= c <= "\uff5e" else c for c in composed)
    kept = "".join(c for c in folded if (c in JOINERS or unicodedata.category(c) != "Cf") and c not in INVISIBLE
                   and not _SELECTOR.match(c))
    return " ".join(_JOINER_RUN.sub(_joiner_as_read, kept).split()).casefold()


# A zero-width (non-)joiner changes what a reader sees only between two emoji (a family is not its faces; a skin
# tone counts as one) or between two letters of a script whose letters join or stack (Arabic, Persian, Syriac,
# Indic, Sinhala, Tibetan, Myanmar, Khmer, Mongolian); elsewhere ("Yes\u200d", "Yes\u200d👍", between two Greek
# letters) it joins nothing.
_JOINER_RUN = re.compile("[\u200c\u200d]+")
_JOINING_SCRIPT = re.compile("[\u0600-\u08ff\u0900-\u0dff\u0f00-\u109f\u1780-\u18af\ua8e0-\ua8ff\ufb50-\ufdff"
                             "\ufe70-\ufeff]")


def _pictograph(c: str) -> bool:
    return unicodedata.category(c) in ("So", "Sk") or "\U0001f000" <= c <= "\U0001faff"


def _joiner_as_read(m: re.Match) -> str:
    text, i, j = m.string, m.start(), m.end()
    before, after = (text[i - 1] if i else ""), (text[j] if j < len(text) else "")
    if before and after and ((_pictograph(before) and _pictograph(after))
                             or (_JOINING_SCRIPT.match(before) and _JOINING_SCRIPT.match(after))):
        return m.group(0)
    return ""


# marks that change nothing a reader sees: variation selectors, the combining grapheme joiner, Mongolian free
# variation selectors, Khmer inherent vowels
_SELECTOR = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef\u034f\u180b-\u180f\u17b4\u17b5]")
# Control characters a message may not hold: all but tab and line breaks (terminal escapes, bells, DEL).
# C0 and C1 controls (U+0080-U+009F: U+009B is an 8-bit terminal escape) but tab, line breaks and NEL
# Invisible marks that cling to words (soft hyphen, zero-width space, bidi marks and embeddings, word joiner and
# invisible operators, BOM): dropped wherever text is read for its words, caption cleaning and search terms alike
# (sh_fold drops the same in Postgres, migrations 0034 and 0050). The zero-width (non-)joiners are not among them: Persian, Indic scripts and
# emoji need them.
CLINGING = re.compile("[\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]")
# What one line (a title, a file name) may not hold: every C0 and C1 control character, line breaks and the line
# and paragraph separators (U+2028, U+2029) included.
LINE_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# The zero-width (non-)joiners: spelling in Persian and Indic words and in emoji, not formatting.
JOINERS = "\u200c\u200d"


def without_format(text: str) -> str:
    """The text without its invisible format characters (a BOM, bidi controls, a soft hyphen, zero-width spaces,
    tags), the joiners kept: what a reader sees, for names, goals and questions."""
    return "".join(c for c in text if c in JOINERS or unicodedata.category(c) != "Cf")


def blank(text: str) -> bool:
    """Nothing to read: only spaces, invisible format characters (a zero-width space), combining marks with
    nothing to combine with, and letters that render as nothing."""
    return all(c.isspace() or c in INVISIBLE or unicodedata.category(c) in ("Cf", "Mn", "Me") for c in text)


def text_problem(text: str, limit: int, what: str = "text") -> tuple[str, str] | None:
    """Why a written text (`what`: a message's text, a question...) is refused, as (code, detail), or None: the
    same rule for a websocket frame and REST."""
    if blank(text):
        return "bad_frame", f"{what} must not be empty"
    if len(text) > limit:
        return "too_long", f"{what} is longer than {limit} characters"
    if CONTROL.search(text):
        return "bad_frame", f"{what} must not contain control characters other than tabs and line breaks"
    return None


def has_nul(raw: str | bytes) -> bool:
    """Whether JSON text holds a NUL character (escaped as `\u0000`, or raw)."""
    data = raw.encode("utf-8", errors="replace") if isinstance(raw, str) else raw
    return b"\x00" in data or (b"\\u0000" in data and _NUL.search(data) is not None)


class _Refs(msgspec.Struct):
    """Only what a refused frame's error echoes back (and its type)."""
    ref: Any = None
    client_msg_id: Any = None
    type: Any = None


# Frames that change something (a post, an edit, a vote), and `resume` (its client ignores sequenced events until
# the welcome it asks for): dropped unread over the frame budget, each is told so by name, so a client knows which
# of its frames to send again (typing and pings go without a word).
CHANGING = frozenset({"message.send", "tutor.ask", "message.edit", "message.delete", "poll.vote", "resume"})


_refs = msgspec.json.Decoder(_Refs)


def ref_of(raw: str | bytes, *, changing: bool = False) -> str | None:
    """The `ref` (else `client_msg_id`) of a frame that failed to decode, when it has a usable one, so the error
    can name the frame it answers. `changing`: only for a frame of a CHANGING type."""
    try:
        got = _refs.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if changing and got.type not in CHANGING:
        return None
    for value in (got.ref, got.client_msg_id):
        if isinstance(value, str) and 0 < len(value) <= 100 and "\x00" not in value:
            return value
    if got.type == "resume":  # (one without a ref is named all the same: its client waits for a welcome,
        return "resume"  # ignoring sequenced events, until it hears; a malformed one as well as a dropped one)
    return None


ECHO_MAX = 200  # characters of a decoder's message an error repeats (it quotes fields and values sent)


def echo(text: str) -> str:
    """A decoder's message, cut to ECHO_MAX characters: it names the unknown field or bad value it met, and a
    64 KiB key made every error frame (queued per socket) and error body that large."""
    return text if len(text) <= ECHO_MAX else text[:ECHO_MAX - 1] + "…"


def decode_frame(raw: str | bytes) -> ClientFrame:
    if has_nul(raw):
        raise BadFrame("a frame's strings must not contain NUL characters (\\u0000)")
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        said = str(exc)  # the rule in words, not the regex ("- at `$.relay.id`" says where)
        where = said.rsplit(" - at `$.", 1)[1].rstrip("`") if " - at `$." in said else None
        if f"matching regex {CLIENT_MSG_ID!r}" in said:
            raise BadFrame(f"{where or 'client_msg_id'} {CLIENT_MSG_ID_RULE}") from exc
        if f"matching regex {NO_CONTROL!r}" in said:
            raise BadFrame(f"{where or 'a name'} must be one line without control characters") from exc
        raise BadFrame(echo(said)) from exc
    except msgspec.DecodeError as exc:
        raise BadFrame(echo(f"not valid JSON: {exc}")) from exc
    except RecursionError as exc:  # msgspec's own limit on nesting
        raise BadFrame("the frame is nested too deeply") from exc


def mmss(seconds: float) -> str:
    """A moment as a learner reads it: m:ss, or h:mm:ss from an hour on."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
