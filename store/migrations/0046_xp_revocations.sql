-- Taking XP back: staff may remove a helpful mark, and the XP it earned goes with it. The ledger stays append-only:
-- a `revoked` row of minus the award's points cancels it (store/xp.py). Only such rows may be negative; the new check
-- is implied by the old one, so it is added NOT VALID: no scan under a lock, and none later (validating would only
-- prove what the old check proved, while every starting process waits for the migration lock). New rows are checked.
-- helpful_marks.xp_key: the ledger key of the mark's XP when it is not `helpful:<message id>` (a mark given again
-- after one was removed earns under `helpful:<id>#2`, …).
ALTER TABLE helpful_marks ADD COLUMN IF NOT EXISTS xp_key text;
ALTER TABLE xp_events DROP CONSTRAINT IF EXISTS xp_events_points_check;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'xp_events'::regclass
                   AND conname = 'xp_events_points_sign') THEN
        ALTER TABLE xp_events ADD CONSTRAINT xp_events_points_sign CHECK (points >= 0 OR kind = 'revoked') NOT VALID;
    END IF;
END $$;
