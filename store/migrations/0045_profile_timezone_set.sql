-- Whether the learner gave their timezone: a profile made with only goals or availability holds 'UTC' as its default,
-- and the matcher took that for a learner living in UTC ("close timezones" for everyone who never said). Rows from
-- before: a zone other than UTC was given; 'UTC' is taken as not given (the matcher's neutral middle).
-- (Old servers of a rolling deploy do not write it: a timezone they store stays "not given" until the next PATCH.)
ALTER TABLE learner_profiles ADD COLUMN IF NOT EXISTS timezone_set boolean NOT NULL DEFAULT false;
UPDATE learner_profiles SET timezone_set = true WHERE timezone <> 'UTC' AND NOT timezone_set;
