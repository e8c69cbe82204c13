-- studyhall: no transaction
-- The HNSW index 0032 dropped, built again over the 768-wide vectors without blocking writes to chunks.
CREATE INDEX CONCURRENTLY IF NOT EXISTS chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
