-- The latest activity that fell after the last counted day ended without making a new day (a local day overlapping
-- the counted one, after a timezone move): a later new day does not charge the day it fell in as missed.
ALTER TABLE streaks ADD COLUMN IF NOT EXISTS active_at timestamptz;
