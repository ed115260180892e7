"""Redis implementations: a capped Stream of records and a versioned weight key.

Keys (prefix from config, default "tide"):
  {p}:records          Stream; XADD MAXLEN ~ cap keeps memory bounded; field "r" holds bytes
  {p}:answers          Stream of served answers (field "a"), capped the same way; every replica
                       reads all of it (XREAD from its last id; stream ids are Redis's clock in
                       ms, so they keep rising across a Redis restart)
  {p}:weights:version  the newest published draft version (int; only ever moves forward)
  {p}:weights:{v}      safetensors bytes of version v (older versions expire)
  {p}:weights:{v}:meta JSON metadata of version v
  {p}:busy             sorted set: replica -> when its "serving requests" mark expires (unix s)
Payloads are bytes only; nothing is pickled.
"""

from __future__ import annotations

import json
import time

import redis

from tide.transport.base import TransportError

GROUP = "trainers"
# The version pointer only moves forward: a late or second publisher cannot roll serving back.
_POINTER_FORWARD = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client for redis:// or rediss:// URLs (password/TLS come from the URL)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=10)


class RedisRecordStream:
    def __init__(self, client: redis.Redis, prefix: str = "tide", maxlen: int = 2000):
        self.r = client
        self.key = f"{prefix}:records"
        self.maxlen = maxlen
        self._group_ready = False

    def append(self, data: bytes) -> None:
        try:
            self.r.xadd(self.key, {"r": data}, maxlen=self.maxlen, approximate=True)
        except redis.RedisError as e:
            raise TransportError(f"record append failed: {e}") from e

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        try:
            self._ensure_group()
            resp = self.r.xreadgroup(GROUP, consumer, {self.key: ">"}, count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):  # the stream was deleted (e.g. Redis restarted): recreate
                self._group_ready = False
                return []
            raise TransportError(f"record read failed: {e}") from e
        except redis.RedisError as e:
            self._group_ready = False
            raise TransportError(f"record read failed: {e}") from e
        out = []
        for _key, entries in resp or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if fields and b"r" in fields:
                    out.append((eid, fields[b"r"]))
        return out

    def ack(self, ids: list[str]) -> None:
        if ids:
            try:
                self.r.xack(self.key, GROUP, *ids)
            except redis.RedisError as e:
                raise TransportError(f"ack failed: {e}") from e

    def length(self) -> int:
        try:
            return int(self.r.xlen(self.key))
        except redis.RedisError as e:
            raise TransportError(f"xlen failed: {e}") from e


class RedisAnswerStream:
    def __init__(self, client: redis.Redis, prefix: str = "tide", maxlen: int = 2000):
        self.r = client
        self.key = f"{prefix}:answers"
        self.maxlen = maxlen

    def append(self, data: bytes) -> None:
        try:
            self.r.xadd(self.key, {"a": data}, maxlen=self.maxlen, approximate=True)
        except redis.RedisError as e:
            raise TransportError(f"answer append failed: {e}") from e

    def read(self, after: str, count: int, block_ms: int) -> list[tuple[str, bytes]]:
        try:  # block=None: answer at once (XREAD's BLOCK 0 would wait forever)
            resp = self.r.xread({self.key: after}, count=count, block=block_ms if block_ms > 0 else None)
        except redis.RedisError as e:
            raise TransportError(f"answer read failed: {e}") from e
        out = []
        for _key, entries in resp or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                out.append((eid, (fields or {}).get(b"a", b"")))
        return out


class RedisWeightChannel:
    def __init__(self, client: redis.Redis, prefix: str = "tide", keep_s: int = 3600):
        self.r = client
        self.prefix = f"{prefix}:weights"
        self.keep_s = keep_s

    def publish(self, version: int, data: bytes, meta: dict) -> None:
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.set(f"{self.prefix}:{version}", data, ex=self.keep_s)
            pipe.set(f"{self.prefix}:{version}:meta", json.dumps(meta), ex=self.keep_s)
            # last, and only forward: readers never see a partial or an older version
            pipe.eval(_POINTER_FORWARD, 1, f"{self.prefix}:version", version)
            pipe.execute()
        except redis.RedisError as e:
            raise TransportError(f"publish failed: {e}") from e

    def latest_version(self) -> int:
        try:
            v = self.r.get(f"{self.prefix}:version")
        except redis.RedisError as e:
            raise TransportError(f"version read failed: {e}") from e
        return int(v) if v is not None else 0

    def fetch(self, version: int) -> tuple[bytes, dict] | None:
        try:
            data, meta = self.r.mget(f"{self.prefix}:{version}", f"{self.prefix}:{version}:meta")
        except redis.RedisError as e:
            raise TransportError(f"weight fetch failed: {e}") from e
        if data is None:
            return None
        return data, json.loads(meta) if meta else {}


class RedisLoadBoard:
    def __init__(self, client: redis.Redis, prefix: str = "tide"):
        self.r = client
        self.key = f"{prefix}:busy"

    def mark(self, replica: str, busy: bool, ttl_s: float) -> None:
        try:
            if busy:
                self.r.zadd(self.key, {replica: time.time() + ttl_s})
            else:
                self.r.zrem(self.key, replica)
        except redis.RedisError as e:
            raise TransportError(f"load mark failed: {e}") from e

    def busy(self) -> int:
        try:
            return int(self.r.zcount(self.key, time.time(), "+inf"))
        except redis.RedisError as e:
            raise TransportError(f"load read failed: {e}") from e
