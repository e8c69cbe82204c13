-- Foundation schema: tenants, users, courses, videos, transcripts, chunks, chapters, enrollments,
-- rooms, messages, jobs. Later migrations add tables in new files.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE tenants (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    role        text NOT NULL CHECK (role IN ('learner', 'instructor', 'admin', 'bot')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- Long-lived, revocable tokens (bots). Short-lived user tokens are not stored.
CREATE TABLE api_tokens (
    id           text PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    label        text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

CREATE TABLE courses (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    owner_id     bigint NOT NULL REFERENCES users(id),
    title        text NOT NULL,
    description  text NOT NULL DEFAULT '',
    published    boolean NOT NULL DEFAULT false,
    price_cents  integer NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX courses_tenant_idx ON courses (tenant_id);

CREATE TABLE enrollments (
    course_id    bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    user_id      bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, user_id)
);
CREATE INDEX enrollments_user_idx ON enrollments (user_id);

CREATE TABLE videos (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id     bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    title         text NOT NULL,
    source        text NOT NULL CHECK (source IN ('youtube', 'transcript', 'media')),
    youtube_id    text,
    filename      text,
    file_path     text,
    duration_s    double precision,
    status        text NOT NULL DEFAULT 'queued',
    embed_model   text,
    embed_dim     integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX videos_course_idx ON videos (course_id);

CREATE TABLE transcript_segments (
    video_id   bigint NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    idx        integer NOT NULL,
    start_s    double precision NOT NULL,
    end_s      double precision NOT NULL,
    text       text NOT NULL,
    PRIMARY KEY (video_id, idx)
);

CREATE TABLE chunks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    video_id    bigint NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    course_id   bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    position    integer NOT NULL,
    start_s     double precision NOT NULL,
    end_s       double precision NOT NULL CHECK (end_s >= start_s),
    text        text NOT NULL,
    sentences   jsonb NOT NULL DEFAULT '[]',
    embed_model text NOT NULL,
    embedding   vector(384),
    tsv         tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (video_id, position)
);
CREATE INDEX chunks_course_idx ON chunks (course_id, embed_model);
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv);

CREATE TABLE chapters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    video_id    bigint NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    idx         integer NOT NULL,
    start_s     double precision NOT NULL,
    end_s       double precision NOT NULL,
    title       text NOT NULL,
    summary     text NOT NULL DEFAULT '',
    UNIQUE (video_id, idx)
);

-- Rooms: 'course:<id>', 'pod:<id>', 'live:<id>'. last_seq hands out the per-room sequence.
CREATE TABLE rooms (
    id          text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('course', 'pod', 'live')),
    course_id   bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    last_seq    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE messages (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id        text NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    seq            bigint NOT NULL,
    author_id      bigint REFERENCES users(id) ON DELETE SET NULL,
    body           text NOT NULL,
    client_msg_id  text,
    meta           jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    edited_at      timestamptz,
    deleted_at     timestamptz,
    UNIQUE (room_id, seq)
);
CREATE UNIQUE INDEX messages_client_msg_idx ON messages (room_id, author_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;

CREATE TABLE jobs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text NOT NULL,
    course_id    bigint REFERENCES courses(id) ON DELETE CASCADE,
    video_id     bigint REFERENCES videos(id) ON DELETE CASCADE,
    created_by   bigint REFERENCES users(id) ON DELETE SET NULL,
    state        text NOT NULL DEFAULT 'queued',
    progress     real NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
    error        text,
    attempts     integer NOT NULL DEFAULT 0,
    payload      jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX jobs_video_idx ON jobs (video_id);
