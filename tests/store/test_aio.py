"""store.aio.cancel_and_wait: a task that lost a cancel (Python 3.11's wait_for drops one) is cancelled again."""
from __future__ import annotations

import asyncio

import pytest

from store.aio import cancel_and_wait


def _deaf(lost: int) -> asyncio.Task:
    """A loop that loses its first `lost` cancels, as one arriving inside a 3.11 wait_for is lost."""
    async def loop() -> None:
        left = lost
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if left == 0:
                    raise
                left -= 1
    return asyncio.create_task(loop())


async def test_a_lost_cancel_is_sent_again():
    task = _deaf(2)
    await asyncio.sleep(0)
    assert await cancel_and_wait(task) is True and task.cancelled()
    stubborn = _deaf(30)
    await asyncio.sleep(0)
    assert await cancel_and_wait(stubborn, timeout=0.3) is False  # bounded: it says so
    assert await cancel_and_wait(stubborn) is True


async def test_a_waiter_cancelled_meanwhile_still_ends_the_task():
    """(Review) cancelled while it waited, it gave up at once and the task ran on."""
    task = _deaf(3)
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.02)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert task.done()
