-- The grade a learner was last given, kept while their answer is graded again (grade-all): they go on seeing it
-- (score, confidence, criteria, feedback, comment, when) until the new grade is final, instead of nothing.
ALTER TABLE submissions ADD COLUMN IF NOT EXISTS released jsonb;
