"""Request and response bodies of assignments, submissions, the grading queue and the adaptive next step."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from server.api.schemas import LINE_TEXT, LINES, Id, Strict, Title, When, check_when

AssignmentType = Literal["multiple_choice", "short_answer", "essay"]
Difficulty = Literal["easy", "medium", "hard"]
Prompt = Annotated[str, Meta(min_length=1, max_length=10_000, pattern=LINES)]
Option = Annotated[str, Meta(min_length=1, max_length=500, pattern=LINE_TEXT)]
Index = Annotated[int, Meta(ge=0, le=99)]
Reference = Annotated[str, Meta(max_length=10_000, pattern=LINES)]
Attempts = Annotated[int, Meta(ge=1, le=100)]
Comment = Annotated[str, Meta(max_length=2_000, pattern=LINES)]
Score = Annotated[float, Meta(ge=0, le=100)]

# Written answers: short answers are short; essays are limited by STUDYHALL_MAX_ANSWER_CHARS.
SHORT_ANSWER_MAX_CHARS = 2_000


class CriterionIn(Strict):
    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=LINE_TEXT)]
    points: Annotated[float, Meta(ge=0.01, le=1_000)]  # scores go to 0.01 of a point
    description: Annotated[str, Meta(max_length=2_000, pattern=LINES)] = ""


Rubric = Annotated[list[CriterionIn], Meta(min_length=1, max_length=20)]


class AssignmentIn(Strict):
    type: AssignmentType
    title: Title
    prompt: Prompt
    options: Annotated[list[Option], Meta(max_length=10)] | None = None
    correct: Annotated[list[Index], Meta(max_length=10)] | None = None
    reference_answer: Reference | None = None
    rubric: Rubric | None = None
    difficulty: Difficulty = "medium"
    max_attempts: Attempts | None = None
    opens_at: When | None = None
    closes_at: When | None = None
    video_id: Id | None = None
    chapter_id: Id | None = None

    def __post_init__(self) -> None:
        check_when(self, "opens_at", "closes_at")


class AssignmentPatch(Strict):
    type: AssignmentType | UnsetType = UNSET
    title: Title | UnsetType = UNSET
    prompt: Prompt | UnsetType = UNSET
    options: Annotated[list[Option], Meta(max_length=10)] | None | UnsetType = UNSET
    correct: Annotated[list[Index], Meta(max_length=10)] | None | UnsetType = UNSET
    reference_answer: Reference | None | UnsetType = UNSET
    rubric: Rubric | None | UnsetType = UNSET
    difficulty: Difficulty | UnsetType = UNSET
    max_attempts: Attempts | None | UnsetType = UNSET
    opens_at: When | None | UnsetType = UNSET
    closes_at: When | None | UnsetType = UNSET
    video_id: Id | None | UnsetType = UNSET
    chapter_id: Id | None | UnsetType = UNSET

    def __post_init__(self) -> None:
        check_when(self, "opens_at", "closes_at")


class GenerateIn(Strict):
    video_id: Id | None = None
    chapter_id: Id | None = None
    count: Annotated[int, Meta(ge=1, le=20)] = 5
    difficulty: Difficulty = "medium"
    types: Annotated[list[Literal["multiple_choice", "short_answer"]], Meta(min_length=1, max_length=2)] = \
        msgspec.field(default_factory=lambda: ["multiple_choice", "short_answer"])


class Criterion(msgspec.Struct):
    name: str
    points: float
    description: str = ""


class Citation(msgspec.Struct):
    video_id: int
    start: float
    end: float | None = None
    text: str | None = None
    url: str | None = None


class Assignment(msgspec.Struct, omit_defaults=True):
    """Learners never get `reference_answer` or `correct` (they are omitted), nor drafts."""

    id: int
    course_id: int
    type: str
    title: str
    prompt: str
    difficulty: str
    status: str
    origin: str
    rubric: list[Criterion]
    max_attempts: int | None
    opens_at: datetime | None
    closes_at: datetime | None
    video_id: int | None
    chapter_id: int | None
    concept: str
    created_at: datetime
    updated_at: datetime
    options: list[str] = []
    citation: Citation | None = None
    reference_answer: str | None = None
    correct: list[int] | None = None
    published_at: datetime | None = None
    attempts_used: int | None = None
    # multiple choice: whether more than one option is correct (choose several) or exactly one (choose one), for
    # everyone (a learner could not tell radio buttons from checkboxes; a one-option pick of several scored 50)
    multiple: bool | None = None


class AssignmentList(msgspec.Struct):
    items: list[Assignment]
    limit: int
    offset: int


class Generated(msgspec.Struct):
    items: list[Assignment]
    generator: str


class SubmissionIn(Strict):
    answer: str | list[Index]


class CriterionScore(msgspec.Struct):
    name: str
    points: float
    score: float
    justification: str = ""


class Submission(msgspec.Struct, omit_defaults=True):
    """A learner sees score, confidence, criteria and feedback only once the grade is final."""

    id: int
    assignment_id: int
    user_id: int
    attempt: int
    status: str
    answer: str | list[int]
    created_at: datetime
    score: float | None = None
    confidence: float | None = None
    criteria: list[CriterionScore] | None = None
    feedback: dict[str, Any] | None = None
    final_at: datetime | None = None
    review_comment: str | None = None
    # staff only
    user_name: str | None = None
    grader: str | None = None
    review_reason: str | None = None
    reviewed_by: int | None = None
    history: list[dict[str, Any]] | None = None


class SubmissionList(msgspec.Struct):
    items: list[Submission]
    limit: int
    offset: int


class ReviewIn(Strict):
    score: Score | None = None
    comment: Comment | None = None


class QueueItem(msgspec.Struct):
    submission_id: int
    assignment_id: int
    assignment_title: str
    assignment_type: str
    prompt: str
    reference_answer: str
    rubric: list[Criterion]
    user_id: int
    user_name: str
    attempt: int
    answer: str | list[int]
    proposed_score: float | None
    confidence: float | None
    criteria: list[CriterionScore]
    feedback: dict[str, Any] | None
    grader: str | None
    reason: str | None
    created_at: datetime


class Queue(msgspec.Struct):
    items: list[QueueItem]
    limit: int
    offset: int


class BatchAccepted(msgspec.Struct):
    job_id: int
    submissions: int
    batches: int


class Moment(msgspec.Struct, omit_defaults=True):
    video_id: int
    start: float
    end: float | None = None
    title: str | None = None
    url: str | None = None


class ConceptState(msgspec.Struct):
    concept: str
    chapter_id: int | None
    video_id: int | None
    assignments: int
    attempted: int
    mean_score: float | None
    status: str  # new | struggling | progressing | mastered
    rewatch: list[Moment]


class NextAssignment(msgspec.Struct):
    id: int
    title: str
    type: str
    difficulty: str
    concept: str


class NextStep(msgspec.Struct):
    difficulty: str
    reason: str
    next: NextAssignment | None
    struggling: list[ConceptState]  # the first `limit` of them
    concepts: list[ConceptState]  # a page of them
    concepts_total: int = 0
    struggling_total: int = 0
    limit: int = 0
    offset: int = 0
