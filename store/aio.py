"""asyncio helpers shared by the server and the workers."""
from __future__ import annotations

import asyncio

# How often a cancel is sent again to a task still running after one.
RECANCEL_S = 0.1


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel a task and wait for its end, cancelling again while it runs on. On Python 3.11 a cancel that lands
    while redis-py sends a command with a socket timeout (through `asyncio.wait_for`, which returns the finished
    command's result and drops the cancel: fixed in 3.12) is lost, and the task goes on; a heartbeat or lock
    keeper awaited after one cancel kept a finished job running for good (four of them stopped a worker's grading)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=RECANCEL_S)
