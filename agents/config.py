"""Build the configured model clients from Settings (one cached instance per process)."""
from __future__ import annotations

import functools

from store.settings import Settings

# OpenAI embeddings are asked for 384 dimensions (text-embedding-3 models can shorten theirs) and stored zero-padded
# in the 768-wide chunks column (store/vectors.py).
EMBED_DIM = 384


@functools.cache
def embedder_for(settings: Settings):  # type: ignore[no-untyped-def]
    """The embedder the settings ask for, loaded once per process."""
    from agents.embedder import get_embedder

    return get_embedder(settings.embedder, openai_api_key=settings.openai_api_key,
                        openai_base_url=settings.openai_base_url, openai_model=settings.openai_embed_model,
                        openai_dim=EMBED_DIM)
