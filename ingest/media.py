"""Uploaded media: sniff the kind from magic bytes, probe it, decode its audio for whisper."""
from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from ingest.errors import PermanentIngestError

logger = logging.getLogger(__name__)

# Read this many leading bytes for `sniff_media`; enough for every header it knows,
# and to look past a small ID3 tag.
SNIFF_BYTES = 4096

SAMPLE_RATE = 16_000  # what whisper expects
# The longest media we transcribe (a small FLAC of silence or a low-bitrate MP3 can hold days). Decoded whole it would
# be 12 h x 16,000 float32 samples/s = 2.8 GB: transcription takes it in slices as it decodes (`audio_blocks`).
MAX_MEDIA_SECONDS = 12 * 3600


def _too_long(seconds: float, limit: float) -> PermanentIngestError:
    return PermanentIngestError(f"media is longer than the {limit / 3600:g} h limit ({seconds / 3600:.1f} h)")

_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}
_MPEG_BITRATE_BAD = 0xF
_MPEG_SAMPLERATE_BAD = 0x3


@dataclass(slots=True, frozen=True)
class MediaInfo:
    """What an upload holds: length, whether it has sound, and the audio codec."""

    duration_s: float
    has_audio: bool
    codec: str | None


def sniff_media(head: bytes) -> str | None:
    """Kind of media from its first bytes (not its name): wav, mp3, aac, m4a, mp4, mov,
    webm, mkv, ogg or flac; None when unrecognised."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        # The EBML header names its DocType within its first few dozen bytes.
        return "webm" if b"webm" in head[:64] else "mkv"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AUDIO_BRANDS:
            return "m4a"
        return "mov" if brand == b"qt  " else "mp4"
    if head[:3] == b"ID3":
        return _after_id3(head)
    if _unicode_text(head):  # a UTF-16/32 transcript's byte-order mark FF FE also reads as an MPEG frame sync
        return None
    return _mpeg_sync(head)


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le", 4), (b"\xff\xfe", "utf-16-le", 2), (b"\xfe\xff", "utf-16-be", 2))


def _unicode_text(head: bytes) -> bool:
    """Starts with a UTF-16/32 byte-order mark followed by printable text."""
    for bom, encoding, width in _BOMS:
        if head.startswith(bom):
            sample = head[len(bom):len(bom) + 1024]
            sample = sample[:len(sample) - len(sample) % width]
            text = sample.decode(encoding, errors="ignore")  # a character cut by the sample's end is dropped
            # no control characters but spacing (anything else is text: marks, emoji newer than this Python's tables)
            return bool(text.strip()) and not any(unicodedata.category(c) == "Cc" and not c.isspace() for c in text)
    return False


MAX_ID3_TAGS = 8  # chained tags looked past; a file of thousands of them recursed until a RecursionError (a 500)


def _after_id3(head: bytes) -> str:
    """An ID3 tag usually fronts an mp3, but may front FLAC or ADTS AAC; peek past it (and past a few more tags
    chained behind it)."""
    for _ in range(MAX_ID3_TAGS):
        if len(head) < 10:
            break
        size = 0
        for byte in head[6:10]:
            size = (size << 7) | (byte & 0x7F)
        offset = 10 + size + (10 if head[5] & 0x10 else 0)
        if offset >= len(head):
            break
        head = head[offset:]
        if head[:3] != b"ID3":
            return sniff_media(head) or "mp3"
    return "mp3"  # (the decoder's probe says whether there is sound behind the tags)


def _mpeg_sync(head: bytes) -> str | None:
    """An MPEG audio frame header: 11 sync bits, then valid version/layer/rate fields."""
    if len(head) < 4 or head[0] != 0xFF or (head[1] & 0xE0) != 0xE0:
        return None
    version = (head[1] >> 3) & 0x3
    layer = (head[1] >> 1) & 0x3
    if layer == 0:
        # ADTS (AAC) uses layer 00 with MPEG-4/-2 version bits.
        return "aac" if (head[1] & 0xF6) == 0xF0 and (head[2] >> 2) & 0xF < 13 else None
    if version == 1:  # reserved
        return None
    if (head[2] >> 4) == _MPEG_BITRATE_BAD or (head[2] >> 2) & 0x3 == _MPEG_SAMPLERATE_BAD:
        return None
    return "mp3"


def _corrupt(path: str | os.PathLike[str], detail: object) -> PermanentIngestError:
    logger.info("unreadable media %s: %s", path, detail)
    # FFmpeg's message without the file name: the reason is shown to instructors.
    text = getattr(detail, "strerror", None) or str(detail)
    return PermanentIngestError(f"corrupt or unsupported media: {text}")


def _packet_end(packet: av.Packet) -> float:
    if packet.pts is None or not packet.time_base:
        return 0.0
    return float((packet.pts + (packet.duration or 0)) * packet.time_base)


MIN_DECODED_S = 0.1  # the least audio a file must decode to (nothing shorter holds a word to transcribe)


def probe_media(path: str | os.PathLike[str], *, require_audio: bool = True,
                max_seconds: float = MAX_MEDIA_SECONDS) -> MediaInfo:
    """Open `path`, check its first audio frame decodes, and report duration and codec.

    Raises PermanentIngestError for garbage, truncated files, media longer than `max_seconds` and (with
    `require_audio`) files with no audio stream.
    """
    try:
        with av.open(os.fspath(path), mode="r", metadata_errors="ignore") as container:
            header = container.duration / av.time_base if container.duration else 0.0
            if not container.streams.audio:
                if require_audio:
                    raise PermanentIngestError("corrupt or unsupported media: no audio stream")
                return MediaInfo(header, False, None)
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # an audio codec FFmpeg has no decoder for
                raise _corrupt(path, "no decoder for its audio codec")
            codec = stream.codec_context.codec.canonical_name
            if not header and stream.duration and stream.time_base:
                header = float(stream.duration * stream.time_base)
            decoded_s, end = 0.0, 0.0
            for packet in container.demux(stream):
                end = max(end, _packet_end(packet))
                if decoded_s < MIN_DECODED_S:
                    try:
                        decoded_s += sum(f.samples / (f.sample_rate or 1) for f in packet.decode())
                    except av.error.InvalidDataError:
                        continue
                if decoded_s >= MIN_DECODED_S and header:
                    break  # without a header duration, demux to the last packet
    except PermanentIngestError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise _corrupt(path, exc) from exc
    if decoded_s <= 0:
        raise _corrupt(path, "no decodable audio")
    if decoded_s < MIN_DECODED_S:  # a WAV cut after its header and a few samples: accepted, then its job failed
        raise _corrupt(path, f"under {MIN_DECODED_S:g} s of decodable audio (a truncated file?)")
    duration = header or end
    if duration <= 0:
        raise _corrupt(path, "zero-length audio")
    if duration > max_seconds:
        raise _too_long(duration, max_seconds)
    return MediaInfo(duration, True, codec)


BLOCK_S = 30.0  # `audio_blocks` hands the samples on in pieces of about this length


def audio_blocks(path: str | os.PathLike[str], max_seconds: float = MAX_MEDIA_SECONDS) -> Iterator[np.ndarray]:
    """The first audio stream as float32 mono samples at 16 kHz, decoded as it is read, in blocks of about
    BLOCK_S: a caller that takes the audio in parts holds only what it keeps (12 hours decoded whole are 2.8 GB).

    Raises PermanentIngestError (when the iteration gets there) when nothing decodes (garbage, truncated, no
    audio) or the audio is longer than `max_seconds` (whatever its header says)."""
    limit, total, block_n = int(max_seconds * SAMPLE_RATE), 0, int(BLOCK_S * SAMPLE_RATE)
    pending: list[np.ndarray] = []
    held = 0

    def take(x: np.ndarray) -> np.ndarray | None:
        nonlocal total, held
        total += x.size
        if total > limit:
            raise _too_long(total / SAMPLE_RATE, max_seconds)
        pending.append(x)
        held += x.size
        if held < block_n:
            return None
        out = np.concatenate(pending)
        pending.clear()
        held = 0
        return out

    try:
        with av.open(os.fspath(path), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise PermanentIngestError("corrupt or unsupported media: no audio stream")
            header = container.duration / av.time_base if container.duration else 0.0
            if header > max_seconds:
                raise _too_long(header, max_seconds)
            stream = container.streams.audio[0]
            stream.thread_type = "AUTO"
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    continue  # one bad packet in a long file should not lose the rest
                for frame in frames:
                    frame.pts = None  # streams with broken timestamps still resample
                    for out in resampler.resample(frame):
                        block = take(out.to_ndarray().reshape(-1))
                        if block is not None:
                            yield block
            for out in resampler.resample(None):
                block = take(out.to_ndarray().reshape(-1))
                if block is not None:
                    yield block
    except PermanentIngestError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise _corrupt(path, exc) from exc
    if pending:
        yield np.concatenate(pending)
    if total == 0:
        raise _corrupt(path, "no decodable audio")


def decode_audio(path: str | os.PathLike[str], max_seconds: float = MAX_MEDIA_SECONDS) -> np.ndarray:
    """The whole of `audio_blocks` in one array (whose errors it raises): for short media and tests; transcription
    takes the blocks as they come."""
    return np.concatenate(list(audio_blocks(path, max_seconds)))
