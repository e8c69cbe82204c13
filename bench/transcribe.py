"""Transcription speed: our Transcriber against bare faster-whisper, same model, audio and run.

`python -m bench.transcribe` synthesizes ~110 s of lecture speech (135 wpm) with espeak-ng, then times
`Transcriber.transcribe` and `WhisperModel.transcribe` (same model, threads, compute type, beam,
VAD and word timestamps) in alternating rounds, and prints each realtime factor (audio seconds per
wall second, median of the rounds) and ours/bare. `--sweep` adds beam sizes 1, 2, 3 and 5 with the
share of script words the transcript misses, which is how DEFAULT_BEAM_SIZE was chosen.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import wave
from pathlib import Path

from faster_whisper import WhisperModel

from ingest.transcribe import DEFAULT_BEAM_SIZE, Transcriber, default_threads, resolve_model

logger = logging.getLogger(__name__)

LECTURE = """\
Welcome back to introductory biology. Today we are going to talk about cells, the basic units of
life. Every living thing is made of one or more cells. Some organisms, like bacteria, are a single
cell. Others, like you and me, are made of trillions of cells working together.
Let us start with the cell membrane. The membrane is a thin layer of lipids that separates the
inside of the cell from the outside world. It decides what comes in and what goes out. Water,
oxygen and carbon dioxide can pass through it easily, but larger molecules need special protein
channels.
Inside the cell we find the cytoplasm, a thick fluid that holds the organelles in place. The
nucleus stores the genetic information in the form of DNA. When a cell divides, the DNA is copied
so that each new cell receives a complete set of instructions.
The mitochondria is the powerhouse of the cell. It turns sugar and oxygen into energy that the
cell can use. Cells that need a lot of energy, such as muscle cells, contain many mitochondria.
Plant cells have a few extra parts. They have a rigid cell wall made of cellulose, and they have
chloroplasts. Photosynthesis happens in the chloroplast, where light energy is used to turn water
and carbon dioxide into sugar and oxygen.
For next week, please read chapter four and answer the review questions at the end of the
chapter. We will have a short quiz on the structure of the cell.
"""


def synthesize(text: str, path: Path, voice: str = "en", wpm: int = 135) -> float:
    """Speak `text` into a wav at `path` with espeak-ng; returns its length in seconds."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is required: apt-get install espeak-ng (make system-deps)")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
    with wave.open(str(path)) as wav:
        return wav.getnframes() / wav.getframerate()


def missed_words(reference: str, hypothesis: str) -> float:
    """Share of reference words absent from an in-order alignment with the hypothesis."""
    ref = re.findall(r"[a-z']+", reference.lower())
    hyp = re.findall(r"[a-z']+", hypothesis.lower())
    matcher = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False)
    return 1 - sum(block.size for block in matcher.get_matching_blocks()) / len(ref)


def bare(model: WhisperModel, path: Path, beam_size: int) -> str:
    """Plain faster-whisper with the settings Transcriber uses."""
    segments, _ = model.transcribe(
        str(path), language="en", beam_size=beam_size, vad_filter=True, word_timestamps=True
    )
    return " ".join(segment.text for segment in segments)


def _busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used (Linux), for spotting other load."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_timed(fn) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class Contention:
    """How much of the machine other processes used while the block ran."""

    def __enter__(self) -> Contention:
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), _busy_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_cpu_s()
        if busy is None or self.busy is None:
            return
        others = max(0.0, busy - self.busy - (time.process_time() - self.own))
        share = others / ((time.perf_counter() - self.wall) * (os.cpu_count() or 1))
        note = "  <- wall figures are pessimistic" if share > 0.05 else ""
        print(f"other processes used {share:.0%} of the {os.cpu_count()} cores meanwhile{note}")


def compare(path: Path, seconds: float, beam_size: int, threads: int, rounds: int) -> None:
    ours = Transcriber(cpu_threads=threads, beam_size=beam_size)
    plain = WhisperModel(
        str(resolve_model()), device="cpu", compute_type="int8", cpu_threads=threads,
        local_files_only=True,
    )
    bare(plain, path, beam_size)  # warm both up (allocators, VAD session, caches)
    ours.transcribe(path)
    print(f"audio {seconds:.1f} s, beam {beam_size}, {threads} threads, int8, VAD, word timestamps")
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "bare": []}
    with Contention():
        for _ in range(rounds):  # alternate, so drifting machine load hits both alike
            runs["ours"].append(cpu_timed(lambda: ours.transcribe(path)))
            runs["bare"].append(cpu_timed(lambda: bare(plain, path, beam_size)))
    rtf = {}
    for name, timings in runs.items():
        rtf[name] = seconds / statistics.median(wall for wall, _ in timings)
        cpu = statistics.median(cpu for _, cpu in timings)
        each = ", ".join(f"{seconds / wall:.1f}" for wall, _ in timings)
        print(f"{name}  {rtf[name]:6.1f}x realtime  (runs: {each}; {cpu / seconds:.3f} CPU s per audio s)")
    print(f"ours/bare {rtf['ours'] / rtf['bare']:.2f}")


def sweep(path: Path, seconds: float, threads: int, rounds: int) -> None:
    model = WhisperModel(
        str(resolve_model()), device="cpu", compute_type="int8", cpu_threads=threads,
        local_files_only=True,
    )
    bare(model, path, 1)
    for beam_size in (1, 2, 3, 5):
        texts: list[str] = []
        with Contention():
            timings = [cpu_timed(lambda: texts.append(bare(model, path, beam_size))) for _ in range(rounds)]
        rtf = seconds / statistics.median(wall for wall, _ in timings)
        cpu = statistics.median(cpu for _, cpu in timings)
        print(f"beam {beam_size}: {rtf:6.1f}x realtime, {cpu / seconds:.3f} CPU s per audio s, "
              f"missed words {missed_words(LECTURE, texts[0]):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM_SIZE)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also compare beam sizes 1, 2, 3, 5")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lecture.wav"
        seconds = synthesize(LECTURE, path)
        compare(path, seconds, args.beam, args.threads, args.rounds)
        if args.sweep:
            sweep(path, seconds, args.threads, args.rounds)


if __name__ == "__main__":
    main()
