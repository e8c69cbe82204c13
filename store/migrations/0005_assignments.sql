-- Assignments, submissions (every attempt kept), the grade history of each submission, and the review
-- queue. A held grade is durable state: the submission stays `review_pending` with the grader's proposal
-- until an instructor approves or overrides it, whatever restarts in between.

CREATE TABLE assignments (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    course_id         bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    video_id          bigint REFERENCES videos(id) ON DELETE SET NULL,
    -- chapters are replaced when a video is re-ingested; `concept` keeps the chapter's title meanwhile
    chapter_id        bigint REFERENCES chapters(id) ON DELETE SET NULL,
    concept           text NOT NULL DEFAULT '',
    type              text NOT NULL CHECK (type IN ('multiple_choice', 'short_answer', 'essay')),
    title             text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    prompt            text NOT NULL,
    options           jsonb NOT NULL DEFAULT '[]',
    correct           jsonb NOT NULL DEFAULT '[]',
    reference_answer  text NOT NULL DEFAULT '',
    rubric            jsonb NOT NULL DEFAULT '[]',
    difficulty        text NOT NULL DEFAULT 'medium' CHECK (difficulty IN ('easy', 'medium', 'hard')),
    max_attempts      integer CHECK (max_attempts IS NULL OR max_attempts >= 1),
    opens_at          timestamptz,
    closes_at         timestamptz,
    status            text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published')),
    origin            text NOT NULL DEFAULT 'instructor' CHECK (origin IN ('instructor', 'generated')),
    -- the moment an item is based on: {video_id, start, end, text}
    citation          jsonb,
    created_by        bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    published_at      timestamptz
);
CREATE INDEX assignments_course_idx ON assignments (course_id, status);

-- One row per attempt. `score`, `confidence`, `criteria`, `feedback` hold the current grade: final when
-- status is 'graded', the grader's proposal while 'review_pending', empty while 'grading'.
CREATE TABLE submissions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    assignment_id  bigint NOT NULL REFERENCES assignments(id) ON DELETE CASCADE,
    course_id      bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    user_id        bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    attempt        integer NOT NULL CHECK (attempt >= 1),
    answer         jsonb NOT NULL,
    status         text NOT NULL CHECK (status IN ('grading', 'review_pending', 'graded')),
    score          real CHECK (score IS NULL OR score BETWEEN 0 AND 100),
    confidence     real CHECK (confidence IS NULL OR confidence BETWEEN 0 AND 1),
    criteria       jsonb NOT NULL DEFAULT '[]',
    feedback       jsonb,
    grader         text,
    review_reason  text,
    review_comment text,
    reviewed_by    bigint REFERENCES users(id) ON DELETE SET NULL,
    grade_job      text,
    grade_tries    integer NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    final_at       timestamptz,
    UNIQUE (assignment_id, user_id, attempt)
);
CREATE INDEX submissions_user_idx ON submissions (user_id, course_id);
CREATE INDEX submissions_queue_idx ON submissions (course_id, created_at) WHERE status = 'review_pending';
CREATE INDEX submissions_grading_idx ON submissions (updated_at) WHERE status = 'grading';
-- instructor-set grades of an assignment: the exemplars the offline grader compares new answers with
CREATE INDEX submissions_reviewed_idx ON submissions (assignment_id, final_at DESC) WHERE reviewed_by IS NOT NULL;

-- Append-only history: every machine grade and every review of a submission.
CREATE TABLE grade_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    submission_id  bigint NOT NULL REFERENCES submissions(id) ON DELETE CASCADE,
    kind           text NOT NULL CHECK (kind IN ('auto', 'machine', 'review')),
    score          real,
    confidence     real,
    criteria       jsonb NOT NULL DEFAULT '[]',
    feedback       jsonb,
    grader         text,
    held           boolean NOT NULL DEFAULT false,
    reason         text,
    comment        text,
    by_user        bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grade_events_submission_idx ON grade_events (submission_id, id);
