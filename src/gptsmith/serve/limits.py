"""Per-client rate limiting: a token bucket per API key (or per client IP when the server has no key)."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """`per_minute` requests a minute on average, with bursts up to `per_minute` (the bucket's size)."""

    def __init__(self, per_minute: int, max_clients: int = 10_000):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def check(self, client: str) -> float:
        """Take one token; returns 0 when allowed, else the seconds to wait before the next request is."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[client] = (tokens - 1, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (1 - tokens) / self.rate
            if len(self._buckets) > self.max_clients:  # forget full buckets: they hold no state worth keeping
                full = [k for k, (t, _) in self._buckets.items() if t >= self.capacity - 1]
                for k in full[: len(self._buckets) - self.max_clients // 2]:
                    del self._buckets[k]
        return wait
