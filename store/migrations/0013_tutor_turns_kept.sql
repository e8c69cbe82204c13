-- Deleting a tutor session keeps its turns' accounting and feedback (the delete erases their text), and a cached
-- answer keeps the nearest moments it pointed to.
ALTER TABLE tutor_turns DROP CONSTRAINT tutor_turns_session_id_fkey;
ALTER TABLE tutor_turns ADD CONSTRAINT tutor_turns_session_id_fkey
    FOREIGN KEY (session_id) REFERENCES tutor_sessions(id) ON DELETE SET NULL;
ALTER TABLE tutor_turns ADD COLUMN nearest jsonb NOT NULL DEFAULT '[]';
