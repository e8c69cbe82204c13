-- The sessions running now, which the worker looks over every minute for ones staff left running.
CREATE INDEX IF NOT EXISTS live_sessions_running_idx ON live_sessions (id) WHERE started_at IS NOT NULL AND ended_at IS NULL;
