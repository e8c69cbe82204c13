-- Whether the learner gave their timezone: a profile made with only goals or availability holds 'UTC' as its default,
-- and the matcher took that for a learner living in UTC ("close timezones" for everyone who never said). Read as
-- given when set, or when the zone is not UTC (store/profiles.py): rows from before, and rows old servers of a rolling
-- deploy write, need no backfill (which would hold the table's lock while it runs); an explicit UTC from before
-- counts as not given (the matcher's neutral middle) until the learner sends it again.
ALTER TABLE learner_profiles ADD COLUMN IF NOT EXISTS timezone_set boolean NOT NULL DEFAULT false;
