"""Waiting on other processes' state, which can only be polled."""

import asyncio


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` (a function, or a coroutine function) until it is true; return its value.

    Fails after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    """``wait_for`` for synchronous tests: poll ``predicate`` until it is true; return its value."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value
