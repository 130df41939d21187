"""Rate and count limits, pure and clock-injected so tests need no sleeping."""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
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

    @property
    def last_taken(self) -> float:
        """When ``take`` was last called (the clock's time); full again ``burst / rate`` later."""
        return self._stamp


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


def address_key(ip: str) -> str:
    """What a per-address limit counts by: an IPv4 address as it is (an
    IPv4-mapped IPv6 one as its IPv4 form), an IPv6 address by its /64, since
    one host or household is handed a whole /64 and could otherwise rotate
    through it.  Anything that does not parse (``"?"``) is its own key."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


#: Addresses a :class:`PerAddressBudget` tracks at most (about 200 bytes each).
MAX_TRACKED_ADDRESSES = 65536


class PerAddressBudget:
    """A token bucket per client address (see :func:`address_key`): ``per_minute``
    actions a minute, up to ``burst`` at once.  ``per_minute <= 0`` means no limit
    (and nothing is tracked).

    Bounded memory: an address whose bucket has refilled (idle for a whole
    ``burst / rate``) is forgotten, which changes nothing (a new bucket is full
    too), and at most ``max_addresses`` are tracked; past that the least
    recently charged is forgotten early (that address gets a fresh bucket: the
    limit leaks a burst to a flood of distinct addresses, the memory does not).
    """

    def __init__(self, per_minute: float, burst: float, max_addresses: int = MAX_TRACKED_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(burst, 1.0)
        self.max_addresses = max(1, max_addresses)
        self.clock = clock
        self.refused = 0
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # least recently charged first

    def take(self, ip: str) -> bool:
        """Charge ``ip`` one action; whether its budget allowed it."""
        if self.rate <= 0:
            return True
        now = self.clock()
        self._expire(now)
        key = address_key(ip)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
            if len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.take():
            return True
        self.refused += 1
        return False

    def _expire(self, now: float) -> None:
        full_after = self.burst / self.rate  # an idle bucket is full again after this long
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets.values()))
            if now - oldest.last_taken < full_after:
                break
            buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
