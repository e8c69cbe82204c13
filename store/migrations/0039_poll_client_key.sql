-- POST /live/{id}/polls with an Idempotency-Key: a double click or a retry after a lost reply opens one poll, not
-- two splitting the room's votes. The key as stored is scoped to its caller ("<user id>:<key>"); NULL: none.
ALTER TABLE polls ADD COLUMN IF NOT EXISTS client_key text;
CREATE UNIQUE INDEX IF NOT EXISTS polls_client_key ON polls (session_id, client_key);
