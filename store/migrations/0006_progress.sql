-- Progress, XP, streaks, achievements and the study-buddy matcher.

-- The learner's profile: timezone (streak days), and the pod profile the matcher reads.
-- availability: weekly slots in the learner's timezone, [[day 0=Mon..6, start_minute, end_minute], ...].
CREATE TABLE learner_profiles (
    user_id       bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    timezone      text NOT NULL DEFAULT 'UTC',
    availability  jsonb NOT NULL DEFAULT '[]',
    goals         text[] NOT NULL DEFAULT '{}',
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Per learner and video. watched: merged, sorted, disjoint [[a, b], ...] seconds; watched_s their length.
CREATE TABLE video_progress (
    user_id       bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    video_id      bigint NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    course_id     bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    position_s    double precision NOT NULL DEFAULT 0 CHECK (position_s >= 0),
    watched       jsonb NOT NULL DEFAULT '[]',
    watched_s     double precision NOT NULL DEFAULT 0 CHECK (watched_s >= 0),
    time_spent_s  double precision NOT NULL DEFAULT 0 CHECK (time_spent_s >= 0),
    completed_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, video_id)
);
CREATE INDEX video_progress_course_idx ON video_progress (course_id, user_id);

CREATE TABLE bookmarks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    video_id    bigint NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    at_s        double precision NOT NULL CHECK (at_s >= 0),
    note        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bookmarks_user_video_idx ON bookmarks (user_id, video_id, at_s);

-- Graded strength per chapter (0..1), written by the grader; the matcher falls back to watch coverage.
CREATE TABLE chapter_scores (
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    chapter_id  bigint NOT NULL REFERENCES chapters(id) ON DELETE CASCADE,
    score       real NOT NULL CHECK (score BETWEEN 0 AND 1),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, chapter_id)
);

-- The XP ledger: the truth every total, level and leaderboard is derived from. Append-only.
-- (user_id, idempotency_key) is unique: the same event twice counts once. pod_ids is the snapshot of the
-- pods the XP counts for, so a leaderboard rebuild gives exactly the ranks the live updates gave.
CREATE TABLE xp_events (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        bigint NOT NULL,  -- the user's tenant (rows go with the user: no second foreign key to check)
    user_id          bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind             text NOT NULL,
    points           integer NOT NULL CHECK (points >= 0),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    course_id        bigint,
    pod_ids          bigint[] NOT NULL DEFAULT '{}',
    at               timestamptz NOT NULL DEFAULT now(),
    meta             jsonb NOT NULL DEFAULT '{}',
    UNIQUE (user_id, idempotency_key)
);
-- No other index: each one is another random page written (and logged) per award. A learner's history is read
-- through the unique index (user_id, ...), rebuilds scan the table.

-- Running totals, kept in the ledger insert's statement: xp and per-kind counts (achievements read them).
-- Free space in each page lets the per-award update stay on its page (HOT: no index write).
CREATE TABLE xp_totals (
    user_id     bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    xp          bigint NOT NULL DEFAULT 0,
    counts      jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);

-- Streak state in the learner's local days. freeze_weeks: Mondays of the ISO weeks whose freeze is spent.
CREATE TABLE streaks (
    user_id       bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    current       integer NOT NULL DEFAULT 0,
    longest       integer NOT NULL DEFAULT 0,
    last_day      date,
    freeze_weeks  date[] NOT NULL DEFAULT '{}',
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_achievements (
    user_id         bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    achievement_id  text NOT NULL,
    unlocked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, achievement_id)
);

-- A message marked helpful by an instructor (or the tutor, marked_by NULL); its author earned XP for it.
CREATE TABLE helpful_marks (
    message_id  bigint PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    room_id     text NOT NULL,
    author_id   bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    marked_by   bigint REFERENCES users(id) ON DELETE SET NULL,
    marked_at   timestamptz NOT NULL DEFAULT now()
);

-- Study-buddy matching rounds of a pod. The newest round not superseded is the current one; a decline
-- supersedes it with a new round of the rest. round_key makes the weekly cron idempotent ('cron:2026-W05').
CREATE TABLE pod_matches (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pod_id         bigint NOT NULL REFERENCES pods(id) ON DELETE CASCADE,
    trigger        text NOT NULL CHECK (trigger IN ('manual', 'cron', 'decline')),
    round_key      text,
    created_by     bigint REFERENCES users(id) ON DELETE SET NULL,
    groups         jsonb NOT NULL,
    declined       bigint[] NOT NULL DEFAULT '{}',
    message_id     bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    superseded_at  timestamptz,
    UNIQUE (pod_id, round_key)
);
CREATE INDEX pod_matches_pod_idx ON pod_matches (pod_id, id DESC);
