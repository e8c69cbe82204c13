-- The Idempotency-Key a client added a video with: a retried upload (its reply lost) finds the video it made
-- instead of storing (and transcribing) the file again.
ALTER TABLE videos ADD COLUMN IF NOT EXISTS client_key text;
CREATE UNIQUE INDEX IF NOT EXISTS videos_client_key ON videos (course_id, client_key) WHERE client_key IS NOT NULL;
