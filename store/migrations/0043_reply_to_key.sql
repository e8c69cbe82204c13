-- messages.reply_to names a message (0041). NOT VALID: added without scanning the table (new rows are checked at
-- once; 0044 checks the rows already there, without blocking writes).
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'messages'::regclass
                   AND conname = 'messages_reply_to_fkey') THEN
        ALTER TABLE messages ADD CONSTRAINT messages_reply_to_fkey FOREIGN KEY (reply_to) REFERENCES messages(id)
            ON DELETE SET NULL NOT VALID;
    END IF;
END $$;
