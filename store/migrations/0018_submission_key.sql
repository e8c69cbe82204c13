-- A learner's own key for a submission (the Idempotency-Key header): a retried submit (a lost response, a double
-- click) returns the attempt it made instead of making another.
ALTER TABLE submissions ADD COLUMN IF NOT EXISTS client_key text;
CREATE UNIQUE INDEX IF NOT EXISTS submissions_client_key_idx ON submissions (assignment_id, user_id, client_key)
    WHERE client_key IS NOT NULL;
