-- A wrong multiple-choice answer was told "Rewatch the moment this question is based on, then try again." whether or
-- not its question had a moment (a hand-written one has none), and the sentence stayed when the moment's video was
-- deleted (its link went). Grades stored so are cleaned here: the sentence goes where no moment stands beside it, in
-- the grade and in the grade a learner was shown while a regrade ran (`released`).
UPDATE submissions
SET feedback = feedback - 'improve'
WHERE feedback ->> 'improve' = 'Rewatch the moment this question is based on, then try again.'
  AND NOT feedback ? 'rewatch';
UPDATE submissions
SET released = jsonb_set(released, '{feedback}', (released -> 'feedback') - 'improve')
WHERE released -> 'feedback' ->> 'improve' = 'Rewatch the moment this question is based on, then try again.'
  AND NOT released -> 'feedback' ? 'rewatch';
