-- Signing a person out everywhere ends their login tokens by generation, not by clock: a token carries the
-- generation it was issued in (`gen`), and a sign-out moves the user to the next one. (0019's `tokens_after`
-- compared issue times, which a host whose clock runs ahead, or two sign-outs within a second, got past.)
ALTER TABLE users ADD COLUMN IF NOT EXISTS token_gen integer NOT NULL DEFAULT 0;
-- who was signed out under 0019 stays signed out: their earlier tokens carry no generation (0)
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'tokens_after')
    THEN UPDATE users SET token_gen = 1 WHERE tokens_after IS NOT NULL;
    END IF;
END $$;
ALTER TABLE users DROP COLUMN IF EXISTS tokens_after;
