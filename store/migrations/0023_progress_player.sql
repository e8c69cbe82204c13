-- Which player's report set the resume position, and its sequence number: a report of the same player with a
-- lower number (sent earlier, arriving late: a retry) no longer moves the position back.
ALTER TABLE video_progress ADD COLUMN IF NOT EXISTS position_player text,
                           ADD COLUMN IF NOT EXISTS position_seq bigint;
