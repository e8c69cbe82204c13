-- Each learner's budget of newly watched video seconds (a token bucket: `seconds` as of `at`, refilling at the
-- playback rate the progress rules allow). Reports that would cover more than it holds are refused with 429 until
-- it refills: a script cannot complete a course in one request per video.
CREATE TABLE IF NOT EXISTS watch_budget (
    user_id  bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    seconds  double precision NOT NULL,
    at       timestamptz NOT NULL
);
