-- The SHA-256 of what a generation was asked (its body, decoded): the same Idempotency-Key with another body is
-- refused (idempotency_key_reused) instead of returning the first request's drafts. Null for older requests.
ALTER TABLE generation_requests ADD COLUMN request_sha bytea;
