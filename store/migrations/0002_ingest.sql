-- Ingest: what a video came from and what its job did.
ALTER TABLE videos ADD COLUMN language text;
ALTER TABLE videos ADD COLUMN captions_generated boolean;
ALTER TABLE videos ADD COLUMN chunk_count integer NOT NULL DEFAULT 0;
ALTER TABLE videos ADD COLUMN error text;
ALTER TABLE videos ADD COLUMN file_size bigint;
ALTER TABLE videos ADD COLUMN file_kind text;

ALTER TABLE jobs ADD COLUMN max_attempts integer NOT NULL DEFAULT 5;
ALTER TABLE jobs ADD COLUMN started_at timestamptz;
CREATE INDEX jobs_unfinished_idx ON jobs (updated_at) WHERE state NOT IN ('done', 'failed');

-- BM25 postings: one row per (chunk, lexeme) with its term frequency and the chunk's length, so full-text
-- ranking is real BM25 (idf over the course's chunks, length normalisation) answered from one index.
ALTER TABLE chunks ADD COLUMN n_terms integer NOT NULL DEFAULT 0;
CREATE TABLE chunk_terms (
    course_id   bigint NOT NULL,
    embed_model text NOT NULL,
    lexeme      text NOT NULL,
    chunk_id    bigint NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
    video_id    bigint NOT NULL,
    tf          integer NOT NULL,
    dl          integer NOT NULL,
    -- INCLUDE: BM25 reads every posting of a query term from the index alone
    PRIMARY KEY (course_id, embed_model, lexeme, chunk_id) INCLUDE (video_id, tf, dl)
);
CREATE INDEX chunk_terms_chunk_idx ON chunk_terms (chunk_id);

-- Per course and model: chunk count and total terms (BM25's N and average length), kept by ingest.
CREATE TABLE course_term_stats (
    course_id    bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    embed_model  text NOT NULL,
    n_chunks     integer NOT NULL,
    total_terms  bigint NOT NULL,
    PRIMARY KEY (course_id, embed_model)
);
