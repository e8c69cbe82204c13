-- The default embedder became MiniLM and e5-small-v2 side by side (768 wide). Narrower vectors (MiniLM alone,
-- OpenAI's 384-wide ones) are stored zero-padded: padding changes no cosine, so chunks embedded before keep their
-- model's name and stay comparable with that model's queries (padded too). Chunks of the old default model are
-- re-embedded when an ingest worker of this version starts (search lists them as awaiting_reembed meanwhile).
-- One transaction (the usual lock timeout and retries): the rewrite holds the table; dropping the HNSW index first
-- spares it the index's upkeep. 0033 builds the index again, concurrently.
DROP INDEX IF EXISTS chunks_embedding_hnsw;
ALTER TABLE chunks ALTER COLUMN embedding TYPE vector(768)
    USING CASE WHEN embedding IS NULL THEN NULL
               ELSE (embedding::real[] || array_fill(0::real, ARRAY[768 - vector_dims(embedding)]))::vector(768) END;
