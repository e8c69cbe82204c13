-- When the learner last changed their timezone (NULL: never, or before this column): a streak's gap before the change
-- is counted in the zone its last day was counted in, so a move made after missing days cannot take them back.
ALTER TABLE learner_profiles ADD COLUMN IF NOT EXISTS timezone_changed_at timestamptz;
