-- studyhall: no transaction
-- 0043's key, checked for the rows written before it (a scan that lets reads and writes go on).
ALTER TABLE messages VALIDATE CONSTRAINT messages_reply_to_fkey;
