"""Local embedder throughput on transcript sentences, against the bare onnxruntime calls.

Run: python -m bench.embed [--n 2000] [--threads N] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

from agents.embedder import LocalMiniLM

logger = logging.getLogger(__name__)

CORPUS = Path("/work/shared/eval/corpus")
_TAG = re.compile(r"<[^>]+>")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def vtt_text(path: Path) -> str:
    """The spoken text of a WebVTT file: no header, cue ids, timestamps or tags."""
    lines = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or "-->" in line or line.isdigit() or line.startswith(("WEBVTT", "NOTE", "Kind:", "Language:")):
            continue
        lines.append(_TAG.sub("", line))
    return " ".join(lines)


def corpus_sentences(n: int, corpus: Path = CORPUS) -> list[str]:
    """About `n` distinct sentences spread evenly over the corpus, in a fixed order."""
    seen: dict[str, None] = {}
    for path in sorted(corpus.glob("*.vtt")):
        for s in _SENTENCE_END.split(vtt_text(path)):
            if s.strip():
                seen.setdefault(s.strip(), None)
    sentences = list(seen)
    step = max(1, len(sentences) // n)
    return sentences[::step][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    sentences = corpus_sentences(args.n)
    emb = LocalMiniLM(threads=args.threads, batch_size=args.batch_size)
    emb.embed(sentences[:64])  # warm-up: first runs allocate and pick kernels

    batches = emb.batches(sentences)
    tokens = sum(int(f["attention_mask"].sum()) for _, f in batches)
    t0 = time.perf_counter()
    for _, feeds in batches:
        emb.session.run(None, feeds)
    bare = time.perf_counter() - t0

    t0 = time.perf_counter()
    emb.embed(sentences)
    full = time.perf_counter() - t0

    n = len(sentences)
    print(f"model      {emb.name}  threads={args.threads or 'default'}  batch_size={args.batch_size}")
    print(f"sentences  {n}  ({tokens} word-pieces, mean {tokens / n:.1f})")
    print(f"baseline   bare session.run on the same pre-tokenised batches: {n / bare:8.1f} sentences/s")
    print(f"embedder   LocalMiniLM.embed (tokenise, sort, pad, run, pool):  {n / full:8.1f} sentences/s")
    print(f"ratio      embedder / baseline = {bare / full:.2f}")


if __name__ == "__main__":
    main()
