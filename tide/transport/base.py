"""The two channels between serving and training, as small interfaces."""

from __future__ import annotations

from typing import Protocol


class TransportError(RuntimeError):
    """The backing store is unreachable or refused an operation."""


class RecordStream(Protocol):
    """A capped stream of record bytes, read through a consumer group with acks."""

    def append(self, data: bytes) -> None: ...

    def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, bytes]]: ...

    def ack(self, ids: list[str]) -> None: ...

    def length(self) -> int: ...


class WeightChannel(Protocol):
    """Whole, versioned draft weights (safetensors bytes) published by the trainer."""

    def publish(self, version: int, data: bytes, meta: dict) -> None: ...

    def latest_version(self) -> int: ...  # 0 when nothing was published

    def fetch(self, version: int) -> tuple[bytes, dict] | None: ...
