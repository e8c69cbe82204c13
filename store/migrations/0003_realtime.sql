-- Realtime rooms: the per-room sequenced event log, author snapshots on messages, moderation,
-- pods, live sessions with attendance and polls.

-- Who wrote a message, as it was when posting (non-human authors such as the tutor have no user row).
ALTER TABLE messages ADD COLUMN author_name text, ADD COLUMN author_role text;
-- Idempotent posts by non-human authors (author_id IS NULL escapes the (room, author, client_msg_id) index).
CREATE UNIQUE INDEX messages_system_client_msg_idx ON messages (room_id, client_msg_id)
    WHERE author_id IS NULL AND client_msg_id IS NOT NULL;

-- Every sequenced event of a room (message.new/edited/deleted, poll.*, live.*), exactly as published.
-- Resume is one range query on the primary key. seq comes from rooms.last_seq in the same transaction.
CREATE TABLE room_events (
    room_id     text NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    type        text NOT NULL,
    message_id  bigint,
    payload     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, seq)
);
CREATE INDEX room_events_message_idx ON room_events (message_id) WHERE message_id IS NOT NULL;

CREATE TABLE room_mutes (
    room_id     text NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    until       timestamptz NOT NULL,
    created_by  bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);

-- A kick closes the user's sockets now; `until` (optional) keeps them out for a while.
CREATE TABLE room_kicks (
    room_id     text NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    until       timestamptz NOT NULL,
    created_by  bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);

CREATE TABLE pods (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id   bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    created_by  bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pods_course_idx ON pods (course_id);

CREATE TABLE pod_members (
    pod_id      bigint NOT NULL REFERENCES pods(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pod_id, user_id)
);
CREATE INDEX pod_members_user_idx ON pod_members (user_id);

CREATE TABLE live_sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id     bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    title         text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    scheduled_at  timestamptz,
    started_at    timestamptz,
    ended_at      timestamptz,
    created_by    bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX live_sessions_course_idx ON live_sessions (course_id);

-- One row per websocket connection to a live room. A server process that dies leaves rows open; the
-- survivors close them at the dead process's last heartbeat (proc_id says whose they were).
CREATE TABLE live_attendance (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  bigint NOT NULL REFERENCES live_sessions(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    proc_id     text NOT NULL,
    joined_at   timestamptz NOT NULL DEFAULT now(),
    left_at     timestamptz
);
CREATE INDEX live_attendance_session_idx ON live_attendance (session_id, user_id);
CREATE INDEX live_attendance_open_idx ON live_attendance (proc_id) WHERE left_at IS NULL;

CREATE TABLE polls (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  bigint NOT NULL REFERENCES live_sessions(id) ON DELETE CASCADE,
    question    text NOT NULL,
    options     jsonb NOT NULL,
    created_by  bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    closed_at   timestamptz
);
CREATE INDEX polls_session_idx ON polls (session_id);

CREATE TABLE poll_votes (
    poll_id     bigint NOT NULL REFERENCES polls(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    option      integer NOT NULL CHECK (option >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (poll_id, user_id)
);
