"""The channels between serving and training (records, weights) and between replicas (answers),
as small interfaces."""

from __future__ import annotations

from typing import Protocol


class TransportError(RuntimeError):
    """The backing store is unreachable or refused an operation."""


class StoreFull(TransportError):
    """The store is reachable but full (Redis at maxmemory): writes fail until it drains."""


class RecordTooLarge(ValueError):
    """One entry larger than the stream's whole byte budget: dropped, never sent."""


class RecordStream(Protocol):
    """A capped stream of record bytes, read through a consumer group with acks."""

    def append(self, data: bytes) -> None: ...

    def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, bytes]]: ...

    def ack(self, ids: list[str]) -> None: ...

    def length(self) -> int: ...


class AnswerStream(Protocol):
    """A capped stream of served answers (small bytes) that every replica reads in full, each
    from where it left off (fan-out: no consumer group, no acks)."""

    def append(self, data: bytes) -> None: ...

    # entries after stream id `after` ("0": from the oldest kept); waits up to block_ms for one
    def read(self, after: str, count: int, block_ms: int) -> list[tuple[str, bytes]]: ...


class WeightChannel(Protocol):
    """Whole, versioned draft weights (safetensors bytes) published by the trainer."""

    def publish(self, version: int, data: bytes, meta: dict) -> None: ...

    def latest_version(self) -> int: ...  # 0 when nothing was published

    def fetch(self, version: int) -> tuple[bytes, dict] | None: ...


class LoadBoard(Protocol):
    """Which replicas are serving requests now, and what speculation earns them, so that a
    trainer sharing their machine can back off (`online.busy_share`). A replica's mark expires
    by itself (a dead replica is not busy)."""

    def mark(self, replica: str, busy: bool, ttl_s: float, gain: float | None = None) -> None: ...

    def busy(self) -> int: ...  # replicas marked busy and not expired

    def gain(self) -> float | None: ...  # the lowest gain the busy replicas reported (None: none did)
