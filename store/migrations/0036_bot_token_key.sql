-- POST /bots with an Idempotency-Key: a retry after a lost reply gets the token the key made, not another live
-- token nobody holds. The key as stored is scoped to its caller ("<user id>:<key>"); NULL: made without one.
ALTER TABLE api_tokens ADD COLUMN IF NOT EXISTS client_key text;
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_client_key ON api_tokens (client_key);
