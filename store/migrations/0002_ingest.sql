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
