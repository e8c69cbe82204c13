-- Per course, model and lexeme: how many chunks hold it (BM25's df), kept by ingest one video at a time, so a
-- search knows every query term's idf before reading any postings and can read the rarest terms first.
-- (IF NOT EXISTS: a development build briefly created it in 0002.) Filled from the postings already stored.
CREATE TABLE IF NOT EXISTS course_term_df (
    course_id    bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    embed_model  text NOT NULL,
    lexeme       text NOT NULL,
    df           integer NOT NULL,
    PRIMARY KEY (course_id, embed_model, lexeme)
);

-- Derived data: recounted whole from the postings (drops whatever a development build left behind).
DELETE FROM course_term_df;
INSERT INTO course_term_df (course_id, embed_model, lexeme, df)
SELECT t.course_id, t.embed_model, t.lexeme, count(*)
FROM chunk_terms t JOIN courses c ON c.id = t.course_id
GROUP BY t.course_id, t.embed_model, t.lexeme;
