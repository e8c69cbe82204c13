-- A course's tutor mode: 'auto' (Socratic while the course has an open assignment, answers otherwise: what 'answer'
-- meant so far, so such courses keep their behaviour), 'answer' (answers even while an assignment is open: an
-- assignment without a closing date is open for good, and made every ask Socratic with no way back) or 'socratic'.
ALTER TABLE courses DROP CONSTRAINT IF EXISTS courses_tutor_mode_check;
UPDATE courses SET tutor_mode = 'auto' WHERE tutor_mode = 'answer';
ALTER TABLE courses ALTER COLUMN tutor_mode SET DEFAULT 'auto';
ALTER TABLE courses ADD CONSTRAINT courses_tutor_mode_check CHECK (tutor_mode IN ('auto', 'answer', 'socratic'));
