-- Withdrawn before release (it made stored upload paths relative, which a worker of the previous release, still
-- running during a deploy, would have swept as unclaimed). Kept so the number is never reused: a database that ran
-- the withdrawn one has it recorded as applied.
SELECT 1;
