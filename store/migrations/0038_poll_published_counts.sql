-- The counts each poll's last `poll.results` carried. Results go out only when they differ (a vote changed to the
-- option it had, or counted already by a publisher in another process, made a repeat), and a survivor sweeping for
-- unpublished votes compares counts, not only times: a vote committed just after another process counted, and
-- stamped before that count, was never published when its own process died.
ALTER TABLE poll_published ADD COLUMN IF NOT EXISTS counts integer[];
