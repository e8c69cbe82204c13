-- Signing a person out everywhere: their tokens issued before this moment stop working (a leaked token, a lost
-- device). NULL: none was ended. Bot tokens are ended one by one (api_tokens.revoked_at).
ALTER TABLE users ADD COLUMN IF NOT EXISTS tokens_after timestamptz;
