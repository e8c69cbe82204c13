-- Signing a person out everywhere ends their login tokens by generation, not by clock: a token carries the
-- generation it was issued in (`gen`), and a sign-out moves the user to the next one. (0019's `tokens_after`
-- compared issue times, which a host whose clock runs ahead, or two sign-outs within a second, got past.)
ALTER TABLE users ADD COLUMN IF NOT EXISTS token_gen integer NOT NULL DEFAULT 0;
ALTER TABLE users DROP COLUMN IF EXISTS tokens_after;
