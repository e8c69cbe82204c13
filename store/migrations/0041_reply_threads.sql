-- Reply threading: a room message may answer an earlier message of the same room (its `reply_to`). The column comes
-- first, its index next (0042, built concurrently), then its foreign key (0043, not validated under a lock; 0044
-- validates it while writes go on): a key before its index would scan all messages for each one deleted meanwhile.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS reply_to bigint;

-- Helpful marks the tutor gave (marked_by is NULL for those, and also for an instructor's mark once that
-- instructor's account is deleted: this tells them apart).
ALTER TABLE helpful_marks ADD COLUMN IF NOT EXISTS by_tutor boolean NOT NULL DEFAULT false;

-- The tutor's check of a learner's reply to another person's question: written with the reply (`pending`), then
-- the worker's verdict. `helpful` replies are marked helpful by the tutor (XP); the others say why not.
CREATE TABLE IF NOT EXISTS reply_checks (
    message_id  bigint PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    room_id     text NOT NULL,
    question_id bigint NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    author_id   bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,  -- the reply's
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'helpful', 'not_helpful', 'skipped', 'failed')),
    reason      text,
    score       real,
    checker     text,  -- "offline", or "llm:<provider>:<model>"
    tries       int NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    claimed_at  timestamptz,  -- the last try's start
    checked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS reply_checks_pending_idx ON reply_checks (created_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS reply_checks_question_idx ON reply_checks (question_id, author_id);
CREATE INDEX IF NOT EXISTS reply_checks_author_idx ON reply_checks (author_id, checked_at);
