-- studyhall: no transaction
-- The default embedder became MiniLM and e5-small-v2 side by side (768 wide). Narrower vectors (MiniLM alone,
-- OpenAI's 384-wide ones) are stored zero-padded: padding changes no cosine, so chunks embedded before keep their
-- model's name and stay comparable with that model's queries (padded too). Chunks of the old default model wait for
-- `studyhall reembed` (search reports them as awaiting_reembed, as after any change of model).
-- The rewrite holds the table while it runs (no index to keep up to date meanwhile); the index is then built
-- concurrently, searches going on by exact scans. Each statement is safe to run again (a 768-wide vector is
-- padded by nothing).
DROP INDEX IF EXISTS chunks_embedding_hnsw;
ALTER TABLE chunks ALTER COLUMN embedding TYPE vector(768)
    USING CASE WHEN embedding IS NULL THEN NULL
               ELSE (embedding::real[] || array_fill(0::real, ARRAY[768 - vector_dims(embedding)]))::vector(768) END;
CREATE INDEX CONCURRENTLY IF NOT EXISTS chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
