-- Tutor answers under way, one row each, held by the server process answering (`proc`, its realtime hub's
-- id). A process that dies mid-answer (kill -9, out of memory) leaves its rows behind; a surviving process
-- replies to the room question (the stored answer when the turn was recorded, else "interrupted, ask again")
-- and gives back the daily-quota question the answer had reserved.
CREATE TABLE IF NOT EXISTS tutor_pending (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    proc        text        NOT NULL,
    user_id     bigint      NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    course_id   bigint      NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    room_id     text,                 -- a room question (NULL: an ask over REST)
    message_id  bigint UNIQUE,        -- the question's message in that room
    reserved    date,                 -- the quota day taken for this answer, until it is recorded or given back
    turn_id     bigint,               -- the recorded answer, once there is one
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tutor_pending_proc_idx ON tutor_pending (proc, id);
