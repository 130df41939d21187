"""Waiting on events, not on time.

Every wait in the tests names the condition it waits for and has a deadline:
``await until(lambda: cond)`` in a test on the event loop, ``until_sync`` in a
test that drives processes or a browser.  A test that must show that something
does *not* happen says exactly what it proves, with a sentinel that travels
behind it (see ``Client.nothing_before_pong`` in tests/clients.py), not a
blind sleep.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _timed_out(timeout: float, cond: Callable[[], Any], what: str | None, last: Any) -> str:
    if not what:
        try:
            what = inspect.getsource(cond).strip()
        except (OSError, TypeError):
            what = repr(cond)
    text = "timed out after %.1fs waiting for: %s" % (timeout, what)
    if last is not None and last is not False:
        text += " (last: %.300r)" % (last,)
    return text


async def until(cond: Callable[[], Any], timeout: float = 3.0, interval: float = 0.005,
                what: str | None = None) -> Any:
    """Call ``cond`` (plain or async) until it returns something truthy, and return that.

    Fails with an AssertionError naming the condition (or ``what``) after
    ``timeout`` seconds.  ``cond`` is tried once more at the deadline, so a
    slow machine fails only when the condition really never held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(_timed_out(timeout, cond, what, value))
        await asyncio.sleep(interval)


def until_sync(cond: Callable[[], T], timeout: float = 5.0, interval: float = 0.05, what: str | None = None,
               sleep: Callable[[float], Any] = time.sleep) -> T:
    """``until`` for code off the event loop (server processes, the browser).

    ``sleep`` is how to pass the time between tries: a Playwright test passes
    ``lambda s: page.wait_for_timeout(s * 1000)`` so page events keep flowing."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, cond, what, value))
        sleep(interval)
