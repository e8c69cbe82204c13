"""asyncio helpers shared by the server and the workers."""
from __future__ import annotations

import asyncio
from collections.abc import Iterable

from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# How often a cancel is sent again to a task still running after one.
RECANCEL_S = 0.1


async def cancel_and_wait(task: asyncio.Task, timeout: float | None = None, *, every: float = RECANCEL_S) -> bool:
    """Cancel a task and wait for its end (up to `timeout` seconds), cancelling again while it runs on; whether it
    ended. On Python 3.11 a cancel can be lost: `asyncio.wait_for` (ours, or redis-py's send under a socket timeout
    before `CancelSafeConnection`) returns a result that has just come and drops a cancel arriving with it (fixed in
    3.12); a heartbeat awaited after one cancel kept a finished job running for good (four of them stopped a worker's
    grading). For tasks whose cancellation cleans up quickly (a loop, a keeper), not one that answers a cancel with
    real work (or give it `every` seconds between cancels: its cleanup's own awaits are cut by the next).
    Cancelled itself meanwhile, it still sees the task cancelled (within `timeout`) before it re-raises."""
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    cancelled = False
    while not task.done() and (deadline is None or asyncio.get_running_loop().time() < deadline):
        task.cancel()
        try:
            await asyncio.wait([task], timeout=every)
        except asyncio.CancelledError:
            cancelled = True
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + every * 10
    if cancelled:
        raise asyncio.CancelledError
    return task.done()


class CancelSafeConnection(Connection):
    """A redis-py connection whose command send, under a socket timeout, does not drop a cancellation: redis-py sends
    through `asyncio.wait_for`, which on Python 3.11 returns the finished send's result and loses a cancel arriving
    just then (a task doing Redis commands back to back, cancelled once, went on 2 times in 3). `asyncio.timeout`
    keeps it. The same body as redis-py 5's `send_packed_command` otherwise."""

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.socket_timeout:
            return await super().send_packed_command(command, check_health)
        if not self.is_connected:
            await self.connect()
        elif check_health:
            await self.check_health()
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            async with asyncio.timeout(self.socket_timeout):
                await self._send_packed_command(command)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {e}.") from e
        except BaseException:
            await self.disconnect(nowait=True)  # (a send cut midway leaves the connection unusable)
            raise
