-- studyhall: no transaction
-- 0034 rewrote every posting: the old rows stay behind as dead tuples until autovacuum comes by, and every BM25 lookup
-- walks them meanwhile (hybrid search measured 1.4 times slower at p95 until a vacuum). Plain VACUUM: reads and
-- writes go on while it runs.
VACUUM ANALYZE chunk_terms;
VACUUM ANALYZE course_term_df;
VACUUM ANALYZE course_term_stats;
