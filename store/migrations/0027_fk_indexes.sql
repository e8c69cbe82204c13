-- studyhall: no transaction
-- Indexes under the foreign keys whose parent rows the product deletes (courses, videos, chapters, tutor turns, rooms).
-- Without one Postgres scans the whole child table for every deleted parent row: deleting a course with 5,000 tutor
-- questions scanned tutor_cache 5,000 times (20 s at 50,000 cached answers, measured; 74 ms with the index), and a
-- re-ingest's chapters scanned chapter_scores once each, while the course row stayed locked.
-- (Users are never deleted by the product; their foreign keys are left without.) Built concurrently: the tables'
-- reads and writes go on meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tutor_cache_turn_idx ON tutor_cache (turn_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS tutor_turns_course_idx ON tutor_turns (course_id, id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS tutor_sessions_course_idx ON tutor_sessions (course_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS tutor_pending_course_idx ON tutor_pending (course_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS chapter_scores_chapter_idx ON chapter_scores (chapter_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS video_progress_video_idx ON video_progress (video_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS bookmarks_video_idx ON bookmarks (video_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS assignments_video_idx ON assignments (video_id) WHERE video_id IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS assignments_chapter_idx ON assignments (chapter_id) WHERE chapter_id IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_course_idx ON jobs (course_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS rooms_course_idx ON rooms (course_id);
