-- Who has the right to a paid course: a row per learner let in (enrolled while the course was paid: by staff now,
-- by a purchase later). It outlives the enrollment, so a learner who left a paid course can enroll again
-- themselves; without it a paid course answers 402 payment_required.
CREATE TABLE course_access (
    course_id   bigint NOT NULL REFERENCES courses(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    source      text NOT NULL DEFAULT 'enrolled' CHECK (source IN ('enrolled', 'purchase')),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, user_id)
);
CREATE INDEX course_access_user_idx ON course_access (user_id);

-- learners in paid courses now were let in already
INSERT INTO course_access (course_id, user_id)
SELECT e.course_id, e.user_id FROM enrollments e JOIN courses c ON c.id = e.course_id WHERE c.price_cents > 0
ON CONFLICT DO NOTHING;
