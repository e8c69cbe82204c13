-- An edit rewrites the message's stored events with its new text (a client resuming from before the post read the
-- text edited out); messages edited before that still had their first text replayed: rewritten here. Only the
-- event's "text" value is replaced, in place (the payload stays msgspec's compact JSON, type first, which readers
-- rely on); it is the first "text" key of both message.new (after the author, which has none) and message.edited.
UPDATE room_events e
SET payload = regexp_replace(e.payload, '"text":"(?:[^"\\]|\\.)*"',
                             replace('"text":' || to_jsonb(m.body)::text, '\', '\\'))
FROM messages m
WHERE e.message_id = m.id AND e.room_id = m.room_id AND e.type IN ('message.new', 'message.edited')
  AND m.edited_at IS NOT NULL AND m.deleted_at IS NULL;
