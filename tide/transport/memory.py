"""In-memory transports for unit tests and single-process use (never the real system)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque


class MemoryRecordStream:
    def __init__(self, maxlen: int = 10_000):
        self._items: deque[tuple[str, bytes]] = deque(maxlen=maxlen)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._delivered = 0  # entries handed to the consumer group so far
        self.acked: set[str] = set()

    def append(self, data: bytes) -> None:
        with self._cond:
            self._items.append((str(next(self._ids)), data))
            self._cond.notify_all()

    def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        with self._cond:
            def fresh():
                return [it for it in self._items if int(it[0]) > self._delivered]
            if not fresh():
                self._cond.wait(block_ms / 1000)
            out = fresh()[:count]
            if out:
                self._delivered = int(out[-1][0])
            return out

    def ack(self, ids: list[str]) -> None:
        self.acked.update(ids)

    def length(self) -> int:
        return len(self._items)


class MemoryAnswerStream:
    def __init__(self, maxlen: int = 2000):
        self._items: deque[tuple[int, bytes]] = deque(maxlen=maxlen)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()

    def append(self, data: bytes) -> None:
        with self._cond:
            self._items.append((next(self._ids), data))
            self._cond.notify_all()

    def read(self, after: str, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        with self._cond:
            def fresh():
                return [(str(i), d) for i, d in self._items if i > int(after)]
            if not fresh() and block_ms > 0:
                self._cond.wait(block_ms / 1000)
            return fresh()[:count]


class MemoryWeightChannel:
    def __init__(self):
        self._versions: dict[int, tuple[bytes, dict]] = {}

    def publish(self, version: int, data: bytes, meta: dict) -> None:
        if version > self.latest_version():  # keep only the newest; the pointer never moves back
            self._versions = {version: (data, dict(meta))}

    def latest_version(self) -> int:
        return max(self._versions, default=0)

    def fetch(self, version: int) -> tuple[bytes, dict] | None:
        return self._versions.get(version)


class MemoryLoadBoard:
    def __init__(self):
        self._until: dict[str, float] = {}
        self._gain: dict[str, float] = {}

    def mark(self, replica: str, busy: bool, ttl_s: float, gain: float | None = None) -> None:
        self._gain.pop(replica, None)
        if busy:
            self._until[replica] = time.monotonic() + ttl_s
            if gain is not None:
                self._gain[replica] = float(gain)
        else:
            self._until.pop(replica, None)

    def busy(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self._until.values() if t > now)

    def gain(self) -> float | None:
        now = time.monotonic()
        gains = [self._gain[r] for r, t in self._until.items() if t > now and r in self._gain]
        return min(gains, default=None)
