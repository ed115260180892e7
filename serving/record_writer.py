"""Streams records to a RecordStream (or answers to an AnswerStream) from a background thread,
so that a slow, absent or full Redis never blocks or fails a request: when the queue is full or
the store is down or full, entries are dropped and counted, and the writer keeps retrying."""

from __future__ import annotations

import logging
import queue
import threading
import time

from tide.transport.base import RecordTooLarge, StoreFull, TransportError

log = logging.getLogger(__name__)


class AsyncRecordWriter:
    def __init__(self, stream, max_pending: int = 32, retry_s: float = 1.0, what: str = "record"):
        self.stream, self.what = stream, what
        self.retry_s = retry_s
        self._q: queue.Queue[bytes] = queue.Queue(maxsize=max_pending)
        self.written = 0
        self.dropped = 0  # every entry not written, whatever the reason
        self.oversized = 0  # ... of which larger than the stream's whole budget
        self.errors = 0  # ... of which failed for a reason other than the store
        self.connected = True
        self.full = False  # the store answered "full" (Redis at maxmemory) on the last try
        self._down_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{what}-writer", daemon=True)
        self._thread.start()

    def submit(self, data: bytes) -> bool:
        """Never blocks. Returns False when the record was dropped."""
        try:
            self._q.put_nowait(data)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if time.monotonic() < self._down_until:  # store known down: drop without waiting
                self.dropped += 1
                continue
            try:
                self.stream.append(data)
                self.written += 1
                if not self.connected or self.full:
                    log.info("%s stream writable again", self.what)
                self.connected, self.full = True, False
            except RecordTooLarge as e:  # this one entry: the store is fine
                self.dropped += 1
                self.oversized += 1
                log.warning("dropping a %s: %s", self.what, e)
            except TransportError as e:
                self.dropped += 1
                if self.connected and not self.full:
                    log.warning("%s stream not writable, dropping %ss: %s", self.what, self.what, e)
                self.full = isinstance(e, StoreFull)
                self.connected = self.full  # a full store is reachable
                self._down_until = time.monotonic() + self.retry_s
            except Exception:  # noqa: BLE001 - the writer outlives anything one entry does
                self.dropped += 1
                self.errors += 1
                log.exception("%s writer: unexpected error; writing on", self.what)

    def close(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._q.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout)
