"""Per-client rate limiting: a token bucket per client (an API key, a session, or a client IP).

Used twice: for requests (serve.rate_limit_per_minute) and for failed authentications
(serve.auth_failures_per_minute), where each failure takes a token and a client with none left is refused.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """`per_minute` requests a minute on average, with bursts up to `per_minute` (the bucket's size).

    A client whose bucket has refilled holds no state worth keeping, so the table is swept of those entries
    at most every `sweep_s` seconds: it holds only the clients seen in about the last minute, however many
    clients (or spoofed keys) come and go."""

    def __init__(self, per_minute: int, sweep_s: float = 30.0):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.sweep_s = sweep_s
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()

    def _tokens(self, client: str, now: float) -> float:
        tokens, last = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def check(self, client: str) -> float:
        """Take one token; returns 0 when allowed, else the seconds to wait before the next request is."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(client, now)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (1 - tokens) / self.rate
            self._sweep(now)
        return wait

    def wait(self, client: str) -> float:
        """The seconds until `client` may spend a token again (0: it may now), without taking one."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            tokens = self._tokens(client, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < self.sweep_s:
            return
        self._last_sweep = now
        full = [k for k, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.capacity]
        for k in full:
            del self._buckets[k]
