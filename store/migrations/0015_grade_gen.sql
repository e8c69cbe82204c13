-- Counts the times a submission was sent (back) to the grader. A run saves its grade only while the count is the one
-- it started with: a run still going when an instructor changed the rubric and asked to grade again must not save
-- the old rubric's grade (the newer run would then find the submission graded and do nothing).
ALTER TABLE submissions ADD COLUMN IF NOT EXISTS grade_gen integer NOT NULL DEFAULT 0;
