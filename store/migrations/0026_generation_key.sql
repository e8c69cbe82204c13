-- The Idempotency-Key a generation of draft assignments was asked with, and the drafts it made: a generation
-- retried after its reply was lost (it runs inside the request, up to two minutes) returns them, not a second set.
CREATE TABLE IF NOT EXISTS generation_requests (
    course_id   bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    client_key  text NOT NULL,
    user_id     bigint NOT NULL,
    generator   text NOT NULL,
    assignment_ids bigint[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, client_key)
);
