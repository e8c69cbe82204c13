-- A YouTube video is in a course once: a second add answers 409 with the first (duplicates filled search results
-- and the tutor's citations with the same moments twice, and made a learner watch it twice to finish the course).
-- Duplicates added before this rule are kept (their progress, chunks and citations stay) but marked, and the rule
-- covers the rest; an instructor may delete them.
ALTER TABLE videos ADD COLUMN IF NOT EXISTS youtube_duplicate boolean NOT NULL DEFAULT false;
UPDATE videos v SET youtube_duplicate = true
WHERE v.youtube_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM videos w WHERE w.course_id = v.course_id AND w.youtube_id = v.youtube_id AND w.id < v.id);
CREATE UNIQUE INDEX IF NOT EXISTS videos_course_youtube_uq ON videos (course_id, youtube_id)
    WHERE youtube_id IS NOT NULL AND NOT youtube_duplicate;
