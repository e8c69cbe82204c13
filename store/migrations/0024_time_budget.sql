-- Each learner's allowance of time spent, over all of their videos (a token bucket like `seconds`: `time_s` as of
-- `time_at`, NULL: full): re-sending watched ranges of many videos at once no longer multiplies time spent.
ALTER TABLE watch_budget ADD COLUMN IF NOT EXISTS time_s double precision,
                         ADD COLUMN IF NOT EXISTS time_at timestamptz;
