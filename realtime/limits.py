"""Rate and count limits, pure and clock-injected so tests need no sleeping."""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    """``rate`` tokens per second, up to ``burst``.  ``rate <= 0`` means no limit.

    ``take()`` spends one token and says whether there was one.
    """

    __slots__ = ("rate", "burst", "_tokens", "_stamp", "_clock")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = self.burst
        self._clock = clock
        self._stamp = clock()

    def take(self, n: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


class FloodGuard:
    """Per-connection message limit: a bucket, plus a count of refusals.

    A client that is refused more than ``strikes`` times within one refill
    period of the bucket (burst / rate seconds) is flooding and is closed.
    """

    def __init__(self, rate: float, burst: float, strikes: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket = TokenBucket(rate, burst, clock)
        self.strikes = strikes
        self._refused = 0
        self._clock = clock
        self._window_start = clock()

    def check(self) -> str:
        """``"ok"``, ``"limited"`` (answer with rate_limited) or ``"flood"`` (close)."""
        if self.bucket.take():
            return "ok"
        now = self._clock()
        period = self.bucket.burst / self.bucket.rate if self.bucket.rate > 0 else 1.0
        if now - self._window_start > period:
            self._window_start = now
            self._refused = 0
        self._refused += 1
        return "flood" if self._refused > self.strikes else "limited"


class ConnectionCounter:
    """Open connections per client address.  ``limit <= 0`` means no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, ip: str) -> bool:
        n = self._counts.get(ip, 0)
        if self.limit > 0 and n >= self.limit:
            return False
        self._counts[ip] = n + 1
        return True

    def add(self, ip: str) -> None:
        """Count one more for ``ip`` whatever the limit (it is already open)."""
        self._counts[ip] = self._counts.get(ip, 0) + 1

    def release(self, ip: str) -> None:
        n = self._counts.get(ip, 0) - 1
        if n <= 0:
            self._counts.pop(ip, None)
        else:
            self._counts[ip] = n

    def count(self, ip: str) -> int:
        return self._counts.get(ip, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())
