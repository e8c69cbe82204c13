-- A YouTube video is in a course once: a second add answers 409 with the first (duplicates filled search results
-- and the tutor's citations with the same moments twice, and made a learner watch it twice to finish the course).
CREATE UNIQUE INDEX IF NOT EXISTS videos_course_youtube_uq ON videos (course_id, youtube_id) WHERE youtube_id IS NOT NULL;
