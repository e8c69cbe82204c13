"""Local embedder throughput on transcript sentences, against the bare onnxruntime calls.

Run: python -m bench.embed [--n 2000] [--threads N] [--batch-size 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from agents.embedder import LocalMiniLM

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("STUDYHALL_EVAL_DIR", ROOT.parent / "shared" / "eval")) / "corpus"
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
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    sentences = corpus_sentences(args.n)
    if not sentences:
        raise SystemExit(f"no .vtt transcripts under {CORPUS} (set STUDYHALL_EVAL_DIR)")
    emb = LocalMiniLM(threads=args.threads, batch_size=args.batch_size)
    emb.embed(sentences[:64])  # warm-up: first runs allocate and pick kernels

    batches = emb.batches(sentences)
    tokens = sum(int(f["attention_mask"].sum()) for _, f in batches)
    unsorted = _unsorted_batches(emb, sentences)

    def bare() -> None:
        for _, feeds in batches:
            emb.session.run(None, feeds)

    def bare_unsorted() -> None:
        for feeds in unsorted:
            emb.session.run(None, feeds)

    # Interleaved repeats, best of each: this machine's timings vary run to run.
    best = {"bare": float("inf"), "embed": float("inf")}
    for _ in range(args.repeat):
        for key, fn in (("bare", bare), ("embed", lambda: emb.embed(sentences))):
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    t0 = time.perf_counter()
    bare_unsorted()
    best["unsorted"] = time.perf_counter() - t0

    n = len(sentences)
    print(f"model      {emb.name}  threads={args.threads or 'default'}  batch_size={args.batch_size}")
    print(f"sentences  {n}  ({tokens} word-pieces, mean {tokens / n:.1f}); best of {args.repeat}")
    print(f"baseline   bare session.run, same pre-tokenised batches:    {n / best['bare']:8.1f} sentences/s")
    print(f"embedder   LocalMiniLM.embed (tokenise, sort, pad, pool):   {n / best['embed']:8.1f} sentences/s")
    print(f"ratio      embedder / baseline = {best['bare'] / best['embed']:.2f}")
    print(f"info       bare session.run, batches in input order (once): {n / best['unsorted']:8.1f} sentences/s")


def _unsorted_batches(emb: LocalMiniLM, sentences: list[str]) -> list[dict]:
    """Batches in input order, padded to their longest text: what sorting by length saves."""
    out = []
    for start in range(0, len(sentences), emb.batch_size):
        part = sentences[start : start + emb.batch_size]
        encs = emb.tokenizer.encode_batch(part)
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encs):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out

if __name__ == "__main__":
    main()
