-- Per-learner daily tutor questions, reserved atomically before an answer runs (a count of today's turns let
-- concurrent asks all pass the limit). Days are UTC. Seeded with today's turns so the limit holds across the
-- upgrade.
CREATE TABLE IF NOT EXISTS tutor_quota (
    user_id bigint  NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    day     date    NOT NULL,
    used    integer NOT NULL CHECK (used >= 0),
    PRIMARY KEY (user_id, day)
);

INSERT INTO tutor_quota (user_id, day, used)
SELECT user_id, (now() AT TIME ZONE 'UTC')::date, count(*)
FROM tutor_turns
WHERE user_id IS NOT NULL AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
GROUP BY user_id
ON CONFLICT (user_id, day) DO NOTHING;
