-- Tutor: private sessions, every answered question (with accounting), feedback, and an answer cache.
ALTER TABLE courses ADD COLUMN tutor_mode text NOT NULL DEFAULT 'answer' CHECK (tutor_mode IN ('answer', 'socratic'));

CREATE TABLE tutor_sessions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id   bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tutor_sessions_user_idx ON tutor_sessions (user_id, course_id, updated_at DESC);

CREATE TABLE tutor_turns (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id      bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    user_id        bigint REFERENCES users(id) ON DELETE SET NULL,
    session_id     bigint REFERENCES tutor_sessions(id) ON DELETE CASCADE,
    room_id        text,
    message_id     bigint,
    question       text NOT NULL,
    standalone     text NOT NULL,
    answer         text NOT NULL,
    grounded       boolean NOT NULL,
    citations      jsonb NOT NULL DEFAULT '[]',
    follow_ups     jsonb NOT NULL DEFAULT '[]',
    mode           text NOT NULL DEFAULT 'answer',
    provider       text NOT NULL,
    model          text NOT NULL,
    input_tokens   integer NOT NULL DEFAULT 0,
    output_tokens  integer NOT NULL DEFAULT 0,
    latency_ms     real NOT NULL DEFAULT 0,
    cost_usd       real,
    cache_hit      boolean NOT NULL DEFAULT false,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tutor_turns_user_day_idx ON tutor_turns (user_id, created_at);
CREATE INDEX tutor_turns_session_idx ON tutor_turns (session_id, id);
CREATE INDEX tutor_turns_message_idx ON tutor_turns (message_id) WHERE message_id IS NOT NULL;

CREATE TABLE tutor_feedback (
    turn_id     bigint NOT NULL REFERENCES tutor_turns(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    vote        smallint NOT NULL CHECK (vote IN (-1, 1)),
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (turn_id, user_id)
);

-- Same normalized question on the same course content -> the stored answer. `content_version` changes
-- whenever the course's videos change, which is what invalidates entries.
CREATE TABLE tutor_cache (
    course_id        bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    content_version  text NOT NULL,
    mode             text NOT NULL,
    qhash            text NOT NULL,
    turn_id          bigint NOT NULL REFERENCES tutor_turns(id) ON DELETE CASCADE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, content_version, mode, qhash)
);

CREATE TABLE room_tutor_settings (
    room_id  text PRIMARY KEY,
    mode     text NOT NULL CHECK (mode IN ('answer', 'socratic'))
);
