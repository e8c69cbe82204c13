-- studyhall: no transaction
-- For 0041, built concurrently (reads and writes go on meanwhile): the replies to a message (0043's key looks them up
-- when a message is deleted for good, with its room), and the tutor's marks of a learner in the last day (its limit).
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_reply_to_idx ON messages (reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS helpful_marks_tutor_idx ON helpful_marks (author_id, marked_at) WHERE by_tutor;
