-- The SHA-256 of the text a message was first posted with: a re-send of its client_msg_id with another text is
-- refused (idempotency_key_reused) also after the message was deleted, when its text is gone. Null for messages
-- posted before this (a re-send of a deleted one then returns it, as before).
ALTER TABLE messages ADD COLUMN text_sha bytea;
