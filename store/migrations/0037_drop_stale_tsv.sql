-- A database that applied 0022 as it was first written kept a stored tsvector column on chunks (nothing reads it:
-- postings are written from the folded text). It cost every chunk insert a second to_tsvector; it goes, and such a
-- database ends up as one that applied 0022 as it is now.
ALTER TABLE chunks DROP COLUMN IF EXISTS tsv;
