-- The minute's reconciler looks for final grades of the last days whose chapter strength missed them.
CREATE INDEX IF NOT EXISTS submissions_final_idx ON submissions (final_at) WHERE status = 'graded';
