"""Redis implementations: byte-capped streams of records and answers, a versioned weight key.

Keys (prefix from config, default "tide"):
  {p}:records          Stream; field "r" holds a record's bytes. Capped in bytes (redis.records_mb):
                       an append trims the oldest entries until the stream fits its budget
  {p}:records:sizes    List, "<id> <bytes>" per entry in stream order: what the trim removes
  {p}:records:stats    Hash: added, bytes, trimmed, trimmed_unread (trimmed before the trainers'
                       group read them), delivered (read by the group): consumer lag = added -
                       trimmed_unread - delivered
  {p}:answers          Stream of served answers (field "a"), capped the same way (redis.answers_mb);
                       every replica reads all of it (XREAD from its last id; stream ids are
                       Redis's clock in ms, so they keep rising across a Redis restart)
  {p}:weights:version  the newest published draft version (int; only ever moves forward)
  {p}:weights:{v}      safetensors bytes of version v; the newest `keep` versions are kept (never
                       expired: the one serving is always there), older ones deleted
  {p}:weights:{v}:meta JSON metadata of version v; with a signing key, "hmac" authenticates the
                       bytes and the version (HMAC-SHA256), and fetch refuses what does not match
  {p}:busy             sorted set: replica -> when its "serving requests" mark expires (unix s)
Payloads are bytes only; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import redis

from tide.transport.base import RecordTooLarge, StoreFull, TransportError

GROUP = "trainers"
# The version pointer only moves forward: a late or second publisher cannot roll serving back.
_POINTER_FORWARD = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""
# XADD, then trim the oldest entries until the stream's bytes fit the budget (never the new
# one), counting those the consumer group had not read yet. Atomic: stream, sizes and counts
# never disagree. KEYS: stream, sizes, stats; ARGV: data, budget bytes, field, group.
_CAPPED_APPEND = """
local size = string.len(ARGV[1])
local id = redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[1])
redis.call('RPUSH', KEYS[2], id .. ' ' .. size)
redis.call('HINCRBY', KEYS[3], 'added', 1)
local bytes = redis.call('HINCRBY', KEYS[3], 'bytes', size)
local budget = tonumber(ARGV[2])
if bytes <= budget then return {id, 0, 0} end
local function parse(x) local a, b = string.match(x, '(%d+)-(%d+)') return tonumber(a), tonumber(b) end
local last_ms, last_seq = -1, -1
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local name, last = nil, nil
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] end
      if g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == ARGV[4] and last then last_ms, last_seq = parse(last) end
  end
end
local trimmed, unread = 0, 0
while bytes > budget and redis.call('LLEN', KEYS[2]) > 1 do
  local head = redis.call('LPOP', KEYS[2])
  local eid, n = string.match(head, '(%S+) (%d+)')
  local ms, seq = parse(eid)
  if ms > last_ms or (ms == last_ms and seq > last_seq) then unread = unread + 1 end
  bytes = redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(n))
  trimmed = trimmed + 1
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', redis.call('LLEN', KEYS[2]))
redis.call('HINCRBY', KEYS[3], 'trimmed', trimmed)
redis.call('HINCRBY', KEYS[3], 'trimmed_unread', unread)
return {id, trimmed, unread}
"""


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client for redis:// or rediss:// URLs (password/TLS come from the URL)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=10)


def _failed(what: str, e: redis.RedisError) -> TransportError:
    if isinstance(e, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(e):
        # maxmemory reached with noeviction: every write fails until something is freed
        return StoreFull(f"{what} failed: Redis is full (maxmemory): {e}")
    return TransportError(f"{what} failed: {e}")


class _CappedStream:
    """A stream whose entries' bytes stay within a budget (oldest trimmed first)."""

    def __init__(self, client: redis.Redis, key: str, field: str, budget_bytes: int):
        self.r, self.key, self.field, self.budget = client, key, field, int(budget_bytes)

    def append(self, data: bytes) -> None:
        if len(data) > self.budget:
            raise RecordTooLarge(f"{len(data)} bytes exceed the stream's budget of {self.budget}")
        try:
            self.r.eval(_CAPPED_APPEND, 3, self.key, f"{self.key}:sizes", f"{self.key}:stats",
                        data, self.budget, self.field, GROUP)
        except redis.RedisError as e:
            raise _failed(f"{self.field} append", e) from e

    def stats(self) -> dict:
        """added, bytes, trimmed, trimmed_unread, delivered, length, and lag (not read yet)."""
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(f"{self.key}:stats")
            pipe.xlen(self.key)
            raw, length = pipe.execute()
        except redis.RedisError as e:
            raise _failed("stream stats", e) from e
        out = {k: int(raw.get(k.encode(), 0)) for k in ("added", "bytes", "trimmed", "trimmed_unread",
                                                          "delivered")}
        out["length"] = int(length)
        out["lag"] = max(0, out["added"] - out["trimmed_unread"] - out["delivered"])
        return out


class RedisRecordStream(_CappedStream):
    def __init__(self, client: redis.Redis, prefix: str = "tide", budget_bytes: int = 256 << 20):
        super().__init__(client, f"{prefix}:records", "r", budget_bytes)
        self._group_ready = False

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
            raise _failed("record read", e) from e
        except redis.RedisError as e:
            self._group_ready = False
            raise _failed("record read", e) from e
        out = []
        for _key, entries in resp or []:
            for entry_id, fields in entries:
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                # an entry without a record field still counts as read (the consumer skips it)
                out.append((eid, (fields or {}).get(b"r", b"")))
        if out:
            try:
                self.r.hincrby(f"{self.key}:stats", "delivered", len(out))
            except redis.RedisError:
                pass  # only the lag figure is off
        return out

    def ack(self, ids: list[str]) -> None:
        if ids:
            try:
                self.r.xack(self.key, GROUP, *ids)
            except redis.RedisError as e:
                raise _failed("ack", e) from e

    def length(self) -> int:
        try:
            return int(self.r.xlen(self.key))
        except redis.RedisError as e:
            raise _failed("xlen", e) from e


class RedisAnswerStream(_CappedStream):
    def __init__(self, client: redis.Redis, prefix: str = "tide", budget_bytes: int = 16 << 20):
        super().__init__(client, f"{prefix}:answers", "a", budget_bytes)

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


def sign(key: bytes, version: int, data: bytes) -> str:
    return hmac.new(key, str(version).encode() + b"\0" + data, hashlib.sha256).hexdigest()


class RedisWeightChannel:
    """key: the signing key (bytes) shared by the trainer and the replicas, or None (unsigned;
    tide requires a key when Redis is not its own embedded one)."""

    def __init__(self, client: redis.Redis, prefix: str = "tide", keep: int = 3, key: bytes | None = None):
        self.r = client
        self.prefix = f"{prefix}:weights"
        self.keep = keep
        self.key = key

    def publish(self, version: int, data: bytes, meta: dict) -> None:
        meta = dict(meta)
        if self.key is not None:
            meta["hmac"] = sign(self.key, version, data)
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.set(f"{self.prefix}:{version}", data)
            pipe.set(f"{self.prefix}:{version}:meta", json.dumps(meta))
            # last, and only forward: readers never see a partial or an older version
            pipe.eval(_POINTER_FORWARD, 1, f"{self.prefix}:version", version)
            pipe.execute()
            newest = self.latest_version()
            old = [f"{self.prefix}:{v}{suffix}" for v in range(max(1, newest - self.keep - 16), newest - self.keep + 1)
                   for suffix in ("", ":meta")]
            if old:
                self.r.delete(*old)
        except redis.RedisError as e:
            raise _failed("publish", e) from e

    def latest_version(self) -> int:
        try:
            v = self.r.get(f"{self.prefix}:version")
        except redis.RedisError as e:
            raise _failed("version read", e) from e
        return int(v) if v is not None else 0

    def fetch(self, version: int) -> tuple[bytes, dict] | None:
        """(bytes, meta), or None if the version is gone. Raises WeightError for a blob whose
        signature is missing or wrong, TransportError when Redis fails."""
        from tide.checkpoint import WeightError

        try:
            data, meta = self.r.mget(f"{self.prefix}:{version}", f"{self.prefix}:{version}:meta")
        except redis.RedisError as e:
            raise _failed("weight fetch", e) from e
        if data is None:
            return None
        try:
            meta = json.loads(meta) if meta else {}
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise WeightError(f"v{version}: metadata is not a JSON object ({e})") from None
        if self.key is not None:
            mac = meta.get("hmac")
            if not isinstance(mac, str) or not hmac.compare_digest(mac, sign(self.key, version, data)):
                raise WeightError(f"v{version}: signature missing or wrong (not published with this "
                                  "system's weights key)")
        return data, meta


class RedisLoadBoard:
    def __init__(self, client: redis.Redis, prefix: str = "tide"):
        self.r = client
        self.key = f"{prefix}:busy"  # replica -> until when it is busy
        self.gains = f"{prefix}:gain"  # replica -> what speculation earns it (a float's text)

    def mark(self, replica: str, busy: bool, ttl_s: float, gain: float | None = None) -> None:
        try:
            pipe = self.r.pipeline()
            if busy:
                pipe.zadd(self.key, {replica: time.time() + ttl_s})
            else:
                pipe.zrem(self.key, replica)
            if busy and gain is not None:
                pipe.hset(self.gains, replica, repr(float(gain)))
            else:
                pipe.hdel(self.gains, replica)
            pipe.execute()
        except redis.RedisError as e:
            raise TransportError(f"load mark failed: {e}") from e

    def gain(self) -> float | None:
        try:
            busy = self.r.zrangebyscore(self.key, time.time(), "+inf")
            values = self.r.hmget(self.gains, busy) if busy else []
        except redis.RedisError as e:
            raise TransportError(f"load read failed: {e}") from e
        gains = []
        for v in values:
            try:
                gains.append(float(v))
            except (TypeError, ValueError):  # not reported, or not a number: ignored
                continue
        return min((g for g in gains if g == g), default=None)

    def busy(self) -> int:
        try:
            return int(self.r.zcount(self.key, time.time(), "+inf"))
        except redis.RedisError as e:
            raise TransportError(f"load read failed: {e}") from e
