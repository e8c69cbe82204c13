-- Reply threading: a room message may answer an earlier message of the same room (its `reply_to`). NOT VALID: every
-- existing row is NULL, so there is nothing to check, and the big table is not scanned under a lock (new rows are
-- checked). Its index comes in 0042, built concurrently.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS reply_to bigint;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'messages_reply_to_fkey') THEN
        ALTER TABLE messages ADD CONSTRAINT messages_reply_to_fkey FOREIGN KEY (reply_to) REFERENCES messages(id)
            ON DELETE SET NULL NOT VALID;
    END IF;
END $$;

-- Helpful marks the tutor gave (marked_by is NULL for those, and also for an instructor's mark once that
-- instructor's account is deleted: this tells them apart).
ALTER TABLE helpful_marks ADD COLUMN IF NOT EXISTS by_tutor boolean NOT NULL DEFAULT false;

-- The tutor's check of a learner's reply to another person's question: written with the reply (`pending`), then
-- the worker's verdict. `helpful` replies are marked helpful by the tutor (XP); the others say why not.
CREATE TABLE IF NOT EXISTS reply_checks (
    message_id  bigint PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    room_id     text NOT NULL,
    question_id bigint NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'helpful', 'not_helpful', 'skipped', 'failed')),
    reason      text,
    score       real,
    tries       int NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    checked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS reply_checks_pending_idx ON reply_checks (created_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS reply_checks_question_idx ON reply_checks (question_id);
