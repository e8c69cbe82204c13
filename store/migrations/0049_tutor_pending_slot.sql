-- The learner's answer slot (Redis, `tutor_slots`) an answer under way holds: a survivor settling the holds of a
-- dead process frees it, so the learner may ask again at once (it lapsed only after the longest answer's time, 3
-- minutes of `tutor_busy` after "interrupted, please ask again"). NULL: staff, bots, or a hold made before this.
ALTER TABLE tutor_pending ADD COLUMN IF NOT EXISTS slot text;
