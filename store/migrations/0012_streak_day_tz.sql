-- The timezone a streak's last day was counted in: after the learner changes timezone, the days the change
-- skipped (moving east) are not counted as missed.
ALTER TABLE streaks ADD COLUMN IF NOT EXISTS day_tz text;
