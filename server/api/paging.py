"""Paging query parameters shared by the list endpoints."""
from __future__ import annotations

from litestar.params import Parameter

# Paged objects (`{items, limit, offset}`) and room history.
PageLimit = Parameter(ge=1, le=200, default=50, description="items per page")
Offset = Parameter(ge=0, le=1_000_000, default=0, description="items to skip")
# Plain JSON arrays: the first `limit` items after `offset`; a page shorter than `limit` is the last one.
ListLimit = Parameter(ge=1, le=500, default=100, description="items per page; a shorter page is the last one")
