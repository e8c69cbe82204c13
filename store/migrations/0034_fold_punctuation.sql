-- Typographic punctuation split words from the full-text side of search: under the embedded database's C locale
-- Postgres's parser takes every non-ASCII character for a letter, so a chunk saying `the “eigenvalue” of A—that is,
-- lambda…` was stored as the lexemes “eigenvalue”, a—that, lambda… and no search for "eigenvalue" or "lambda"
-- found it by its words. sh_fold now also turns Unicode punctuation (general punctuation but the curly apostrophes
-- it straightens, « » ¿ ¡ ·, CJK and fullwidth punctuation) into spaces and drops invisible marks (zero-width
-- space, bidi marks, word joiner, BOM; not the zero-width (non-)joiners scripts need), as the questions' side is.
ALTER FUNCTION sh_fold(text) RENAME TO sh_fold_accents;
CREATE OR REPLACE FUNCTION sh_fold(t text) RETURNS text LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fold$
    SELECT regexp_replace(
        regexp_replace(sh_fold_accents(t), U&'[\200B\200E\200F\202A-\202E\2060-\2069\FEFF]', '', 'g'),
        U&'[\2010-\2017\201A-\205E\00A1\00AB\00B7\00BB\00BF\3000-\303F\FF01-\FF0F\FF1A-\FF20\FF3B-\FF40\FF5B-\FF65]',
        ' ', 'g')
$fold$;

-- Derived data, derived again (as 0022 did): postings, each chunk's length, df, N and total length.
DELETE FROM chunk_terms;
DELETE FROM course_term_df;
DELETE FROM course_term_stats;
WITH terms AS (
    SELECT c.id, c.course_id, c.embed_model, c.video_id, u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
    FROM chunks c, unnest(to_tsvector('english', sh_fold(c.text))) u),
lengths AS (SELECT id, sum(tf)::int AS dl FROM terms GROUP BY id),
upd AS (UPDATE chunks c SET n_terms = coalesce(l.dl, 0) FROM chunks c2 LEFT JOIN lengths l ON l.id = c2.id
        WHERE c.id = c2.id AND c.n_terms IS DISTINCT FROM coalesce(l.dl, 0)),
postings AS (
    INSERT INTO chunk_terms (course_id, embed_model, lexeme, chunk_id, video_id, tf, dl)
    SELECT t.course_id, t.embed_model, t.lexeme, t.id, t.video_id, t.tf, l.dl FROM terms t JOIN lengths l USING (id)),
df AS (
    INSERT INTO course_term_df (course_id, embed_model, lexeme, df)
    SELECT course_id, embed_model, lexeme, count(*) FROM terms GROUP BY 1, 2, 3)
INSERT INTO course_term_stats (course_id, embed_model, n_chunks, total_terms)
SELECT c.course_id, c.embed_model, count(*), coalesce(sum(l.dl), 0)
FROM chunks c LEFT JOIN lengths l USING (id) GROUP BY 1, 2;
