-- The words a video's transcript uses, as spoken (lower-cased, not stemmed): the tutor's judge asks whether a
-- name or a rare term in a question occurs anywhere in the course ("determinant" is not "determine", "GPT-2" is
-- not "GPT-3"). Kept by ingest with the chunks; goes with the video.
CREATE TABLE video_words (
    course_id  bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    word       text NOT NULL,
    video_id   bigint NOT NULL REFERENCES videos(id) ON DELETE CASCADE,
    PRIMARY KEY (course_id, word, video_id)
);
CREATE INDEX video_words_video_idx ON video_words (video_id);

-- The same tokenization as store/videos.py spoken_words (WORD_RE, common Latin accents folded), for the chunks
-- already stored.
INSERT INTO video_words (course_id, word, video_id)
SELECT DISTINCT c.course_id, m[1], c.video_id
FROM chunks c, regexp_matches(lower(translate(c.text, '’‘àáâãäåçèéêëìíîïñòóôõöùúûüýÿÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝ',
                                                        '''''aaaaaaceeeeiiiinooooouuuuyyaaaaaaceeeeiiiinooooouuuuy')),
                               '([a-z0-9]+(?:[''-][a-z0-9]+)*)', 'g') AS m
ON CONFLICT DO NOTHING;
