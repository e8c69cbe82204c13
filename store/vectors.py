"""The width of the stored embeddings (chunks.embedding, migration 0032) and the padding that fits narrower ones.

A model narrower than the column (MiniLM alone, OpenAI asked for 384) is stored and queried zero-padded: padding
changes no cosine, and a model only ever meets its own vectors (every chunk stores its model's name).
"""
from __future__ import annotations

import numpy as np

STORED_DIM = 768


def stored(vec: np.ndarray) -> np.ndarray:
    """`vec` (one vector or rows of them) as the column holds it: float32, zero-padded to STORED_DIM."""
    vec = np.asarray(vec, dtype=np.float32)
    width = vec.shape[-1]
    if width == STORED_DIM:
        return vec
    if width > STORED_DIM:
        raise ValueError(f"a {width}-wide embedding does not fit the {STORED_DIM}-wide column")
    pad = [(0, 0)] * (vec.ndim - 1) + [(0, STORED_DIM - width)]
    return np.pad(vec, pad)
