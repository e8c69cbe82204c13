-- Accent-insensitive full-text search without the unaccent extension (the embedded Postgres has none): the chunks'
-- lexemes and the questions' are taken from the text with accents folded ("Schrödinger" is found by "schrodinger"
-- and the other way round, "café" by "cafe"), as the judge's word list already is (store/videos.py fold).
-- sh_fold drops combining accents (text stored decomposed), then maps each Latin letter that Unicode decomposes
-- into an ASCII letter and accents (U+00C0-U+024F, U+1E00-U+1EFF: what store.videos.fold folds there) to that
-- letter, and curly apostrophes to straight ones.
CREATE OR REPLACE FUNCTION sh_fold(t text) RETURNS text LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fold$
    SELECT translate(regexp_replace(t, U&'[\0300-\036F]', '', 'g'),
        '’‘ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÑÒÓÔÕÖÙÚÛÜÝàáâãäåçèéêëìíîïñòóôõöùúûüýÿĀāĂăĄ'
        || 'ąĆćĈĉĊċČčĎďĒēĔĕĖėĘęĚěĜĝĞğĠġĢģĤĥĨĩĪīĬĭĮįİĴĵĶķĹĺĻļĽľŃńŅņŇňŌōŎŏ'
        || 'ŐőŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŨũŪūŬŭŮůŰűŲųŴŵŶŷŸŹźŻżŽžſƠơƯưǍǎǏǐǑǒǓǔǕǖǗǘ'
        || 'ǙǚǛǜǞǟǠǡǦǧǨǩǪǫǬǭǰǴǵǸǹǺǻȀȁȂȃȄȅȆȇȈȉȊȋȌȍȎȏȐȑȒȓȔȕȖȗȘșȚțȞȟȦȧȨȩȪȫȬ'
        || 'ȭȮȯȰȱȲȳḀḁḂḃḄḅḆḇḈḉḊḋḌḍḎḏḐḑḒḓḔḕḖḗḘḙḚḛḜḝḞḟḠḡḢḣḤḥḦḧḨḩḪḫḬḭḮḯḰḱḲḳḴ'
        || 'ḵḶḷḸḹḺḻḼḽḾḿṀṁṂṃṄṅṆṇṈṉṊṋṌṍṎṏṐṑṒṓṔṕṖṗṘṙṚṛṜṝṞṟṠṡṢṣṤṥṦṧṨṩṪṫṬṭṮṯṰ'
        || 'ṱṲṳṴṵṶṷṸṹṺṻṼṽṾṿẀẁẂẃẄẅẆẇẈẉẊẋẌẍẎẏẐẑẒẓẔẕẖẗẘẙẛẠạẢảẤấẦầẨẩẪẫẬậẮắẰằ'
        || 'ẲẳẴẵẶặẸẹẺẻẼẽẾếỀềỂểỄễỆệỈỉỊịỌọỎỏỐốỒồỔổỖỗỘộỚớỜờỞởỠỡỢợỤụỦủỨứỪừỬử'
        || 'ỮữỰựỲỳỴỵỶỷỸỹ',
        '''''AAAAAACEEEEIIIINOOOOOUUUUYaaaaaaceeeeiiiinooooouuuuyyAaAaA'
        || 'aCcCcCcCcDdEeEeEeEeEeGgGgGgGgHhIiIiIiIiIJjKkLlLlLlNnNnNnOoOo'
        || 'OoRrRrRrSsSsSsSsTtTtUuUuUuUuUuUuWwYyYZzZzZzsOoUuAaIiOoUuUuUu'
        || 'UuUuAaAaGgKkOoOojGgNnAaAaAaEeEeIiIiOoOoRrRrUuUuSsTtHhAaEeOoO'
        || 'oOoOoYyAaBbBbBbCcDdDdDdDdDdEeEeEeEeEeFfGgHhHhHhHhHhIiIiKkKkK'
        || 'kLlLlLlLlMmMmMmNnNnNnNnOoOoOoOoPpPpRrRrRrRrSsSsSsSsSsTtTtTtT'
        || 'tUuUuUuUuUuVvVvWwWwWwWwWwXxXxYyZzZzZzhtwysAaAaAaAaAaAaAaAaAa'
        || 'AaAaAaEeEeEeEeEeEeEeEeIiIiOoOoOoOoOoOoOoOoOoOoOoOoUuUuUuUuUu'
        || 'UuUuYyYyYyYy')
$fold$;

-- The lexemes are now taken from the folded text when postings are written (store/videos.py _ADD_TERMS); the
-- stored tsvector column goes (dropping a column rewrites nothing; nothing searched its GIN index).
ALTER TABLE chunks DROP COLUMN tsv;

-- Derived data, derived again from the folded text: postings, each chunk's length, df, N and total length.
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
