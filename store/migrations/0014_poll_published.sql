-- When each poll's counts were last published (`poll.results`). A vote newer than that whose results never went
-- out (its server process died inside the 250 ms window that coalesces them) is published by a survivor.
CREATE TABLE IF NOT EXISTS poll_published (
    poll_id  bigint PRIMARY KEY REFERENCES polls(id) ON DELETE CASCADE,
    at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS polls_open_idx ON polls (id) WHERE closed_at IS NULL;
