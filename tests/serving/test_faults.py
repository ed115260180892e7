"""Fault behaviour without Ray: Redis down at start and mid-run, bad weight updates, stream caps."""

import time

import pytest
import torch

from serving.engine import ServingEngine
from serving.record_writer import AsyncRecordWriter
from tests.conftest import tiny_target
from tide.checkpoint import new_head, state_to_bytes
from tide.config import TideConfig
from tide.lookup import answer_from_bytes, answer_to_bytes
from tide.records import HiddenStateRecord
from tide.speculative import target_generate
from tide.transport.base import RecordTooLarge
from tide.transport.memory import MemoryWeightChannel
from tide.transport.redis_server import free_port, start_redis
from tide.transport.redis_transport import RedisAnswerStream, RedisRecordStream, RedisWeightChannel, connect

pytestmark = pytest.mark.integration


def _engine(url, **writer_kw):
    cfg = TideConfig()
    cfg.decode.max_new_tokens = 12
    target = tiny_target()
    client = connect(url, timeout_s=0.5)
    writer = AsyncRecordWriter(RedisRecordStream(client, "t", budget_bytes=8 << 20), **writer_kw)
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0, writer, RedisWeightChannel(client, "t"))
    return engine, target


def _wait(cond, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_redis_down_at_start_then_mid_run_keeps_serving(tmp_path):
    port = free_port()
    engine, target = _engine(f"redis://127.0.0.1:{port}/0", retry_s=0.2)
    expected = target_generate(target, [1, 2, 3], engine.cfg.decode).tokens
    # no Redis at all: requests succeed, records are dropped and counted
    for _ in range(3):
        assert engine.generate([1, 2, 3], engine.cfg.decode)["tokens"] == expected
    assert _wait(lambda: engine.writer.dropped >= 3)
    assert engine.writer.written == 0 and not engine.writer.connected
    assert not engine.poll_weights()  # weight polling fails quietly too
    # Redis comes up: the writer reconnects by itself
    server = start_redis(tmp_path / "r", port=port, password=None)
    try:
        time.sleep(0.3)
        for _ in range(3):
            engine.generate([1, 2, 3], engine.cfg.decode)
        assert _wait(lambda: engine.writer.written >= 1)
        assert RedisRecordStream(connect(server.url), "t").length() == engine.writer.written
    finally:
        server.stop()
    # Redis dies mid-run: still serving, drops counted
    dropped = engine.writer.dropped
    for _ in range(3):
        assert engine.generate([1, 2, 3], engine.cfg.decode)["tokens"] == expected
    assert _wait(lambda: engine.writer.dropped > dropped)
    engine.stop()


def test_slow_redis_never_blocks_a_request():
    class SlowStream:
        def append(self, data):
            time.sleep(1.0)

    target = tiny_target()
    writer = AsyncRecordWriter(SlowStream(), max_pending=1)
    engine = ServingEngine(TideConfig(), "r0", target, new_head(target, 64), 0, writer)
    engine.cfg.decode.max_new_tokens = 8
    t0 = time.perf_counter()
    for _ in range(4):
        engine.generate([1, 2, 3], engine.cfg.decode)
    assert time.perf_counter() - t0 < 3.0  # 4 writes would take 4 s if requests waited on them
    assert writer.dropped >= 2


def test_corrupt_and_mismatched_updates_are_rejected(redis_server):
    engine, target = _engine(redis_server.url)
    channel = RedisWeightChannel(connect(redis_server.url), "t")
    before = {k: v.clone() for k, v in engine.head.state_dict().items()}
    expected = target_generate(target, [4, 5, 6], engine.cfg.decode).tokens
    channel.publish(1, b"\x00garbage", {"published_at": time.time()})
    assert not engine.poll_weights()
    other = new_head(tiny_target(hidden=32), 64)  # a head for another target: shapes differ
    channel.publish(2, state_to_bytes(other), {"published_at": time.time()})
    assert not engine.poll_weights()
    assert engine.version == 0 and engine.stats()["swaps_rejected"] == 2
    assert all(torch.equal(before[k], v) for k, v in engine.head.state_dict().items())
    assert engine.generate([4, 5, 6], engine.cfg.decode)["tokens"] == expected
    good = new_head(target, 64, seed=9)
    channel.publish(3, state_to_bytes(good), {"published_at": time.time()})
    assert engine.poll_weights() and engine.version == 3
    assert engine.stats()["last_swap_latency_s"] is not None
    assert engine.generate([4, 5, 6], engine.cfg.decode)["tokens"] == expected  # still lossless
    engine.stop()


def test_nan_oversized_unsigned_and_bad_metadata_updates_are_rejected(redis_server):
    client = connect(redis_server.url)
    key = b"k" * 32
    signed = RedisWeightChannel(client, "sig", key=key)
    cfg = TideConfig()
    cfg.decode.max_new_tokens = 8
    target = tiny_target()
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0, weights=signed)
    good = new_head(target, 64, seed=3)
    nan = new_head(target, 64, seed=3)
    next(p for p in nan.parameters() if p.is_floating_point()).data[0] = float("nan")
    now = {"published_at": time.time()}
    signed.publish(1, state_to_bytes(nan), now)
    assert not engine.poll_weights()
    signed.publish(2, state_to_bytes(good) + b"\0" * (64 << 20), now)  # oversized: never parsed
    assert not engine.poll_weights()
    RedisWeightChannel(client, "sig").publish(3, state_to_bytes(good), now)  # unsigned
    assert not engine.poll_weights()
    RedisWeightChannel(client, "sig", key=b"another key").publish(4, state_to_bytes(good), now)  # forged
    assert not engine.poll_weights()
    signed.publish(5, state_to_bytes(good), now)
    client.set("sig:weights:5:meta", b"[not an object")  # metadata that does not parse
    assert not engine.poll_weights()
    errors = engine.stats()
    assert engine.version == 0 and errors["swaps_rejected"] == 5 and errors["swaps_applied"] == 0
    signed.publish(6, state_to_bytes(good), now)  # the trainer's own: applied
    assert engine.poll_weights() and engine.version == 6
    assert engine.generate([4, 5, 6], cfg.decode)["tokens"] == target_generate(target, [4, 5, 6], cfg.decode).tokens
    # the newest keep (3) versions stay in Redis, with no expiry; older ones are deleted
    assert client.exists("sig:weights:1") == 0 and client.exists("sig:weights:6") == 1
    assert client.ttl("sig:weights:6") == -1
    engine.stop()


def test_the_load_board_reports_the_lowest_gain_of_the_busy_replicas(redis_server):
    """Redis and its in-memory twin alike: a gain counts while its replica's mark holds; an
    unmarked or expired replica's, or a value that is not a number, does not."""
    from tide.transport.memory import MemoryLoadBoard
    from tide.transport.redis_transport import RedisLoadBoard

    client = connect(redis_server.url)
    for board in (RedisLoadBoard(client, "gain"), MemoryLoadBoard()):
        assert board.busy() == 0 and board.gain() is None
        board.mark("a", True, 60, gain=1.4)
        board.mark("b", True, 60)  # reports none
        assert board.busy() == 2 and board.gain() == pytest.approx(1.4)
        board.mark("c", True, 0.2, gain=1.1)
        assert board.gain() == pytest.approx(1.1)
        time.sleep(0.3)  # c stops refreshing its mark
        assert board.busy() == 2 and board.gain() == pytest.approx(1.4)
        board.mark("a", False, 0, gain=1.4)
        assert board.gain() is None
    client.hset("gain:gain", "b", "not a number")
    assert RedisLoadBoard(client, "gain").gain() is None


def test_the_version_pointer_never_moves_back(redis_server):
    for channel in (RedisWeightChannel(connect(redis_server.url), "fwd"), MemoryWeightChannel()):
        channel.publish(5, b"five", {"v": 5})
        channel.publish(3, b"three", {"v": 3})  # a late or second publisher
        assert channel.latest_version() == 5 and channel.fetch(5) == (b"five", {"v": 5})
        channel.publish(6, b"six", {})
        assert channel.latest_version() == 6


def test_stream_stays_within_its_byte_budget_and_counts_what_it_trimmed_unread(redis_server):
    client = connect(redis_server.url)
    budget = 2 << 20
    stream = RedisRecordStream(client, "cap", budget_bytes=budget)
    rec = HiddenStateRecord(request_id="x", target_model_id="t", draft_version=0,
                            input_ids=torch.arange(65), features=torch.randn(64, 96),
                            final_hidden=torch.randn(64, 32), prompt_len=4).to_bytes()
    big = HiddenStateRecord(request_id="big", target_model_id="t", draft_version=0,
                            input_ids=torch.arange(257), features=torch.randn(256, 96),
                            final_hidden=torch.randn(256, 32), prompt_len=4).to_bytes()
    stream.read("c", count=1, block_ms=1)  # the consumer group exists, has read nothing
    for i in range(400):  # records of two sizes: a count cap could not bound these bytes
        stream.append(big if i % 3 == 0 else rec)
    st = stream.stats()
    assert st["bytes"] <= budget and st["bytes"] > budget - len(big) - len(rec)
    assert client.memory_usage(stream.key) < 1.3 * budget
    assert st["added"] == 400 and st["trimmed"] == 400 - st["length"] == st["trimmed_unread"]
    assert st["lag"] == st["length"]  # nothing read yet: every entry kept is lag
    # the consumer group reads what is there, in order, and the lag falls as it reads
    items = stream.read("c", count=10, block_ms=100)
    assert len(items) == 10 and HiddenStateRecord.from_bytes(items[0][1]).request_id in ("x", "big")
    stream.ack([i for i, _ in items])
    assert client.xpending(stream.key, "trainers")["pending"] == 0
    assert stream.stats()["lag"] == st["length"] - 10
    # entries already read are trimmed as read, not as lost
    for _ in range(40):
        stream.append(rec)
    after = stream.stats()
    assert after["trimmed_unread"] - st["trimmed_unread"] == after["trimmed"] - st["trimmed"] - 10
    with pytest.raises(RecordTooLarge):
        stream.append(b"x" * (budget + 1))


def test_full_redis_is_reported_and_serving_goes_on(tmp_path):
    server = start_redis(tmp_path / "full", maxmemory_mb=3)
    try:
        engine, target = _engine(server.url, retry_s=0.05)
        expected = target_generate(target, [1, 2, 3], engine.cfg.decode).tokens
        filler = connect(server.url)
        with pytest.raises(Exception, match="maxmemory"):
            for i in range(2000):  # small pieces: full to within 4 KB
                filler.set(f"fill{i}", b"x" * 4096)
        for _ in range(3):
            assert engine.generate([1, 2, 3], engine.cfg.decode)["tokens"] == expected
        assert _wait(lambda: engine.stats()["record_store_full"])
        stats = engine.stats()
        assert stats["records_dropped"] >= 1 and stats["record_stream_connected"]
        filler.delete(*[f"fill{i}" for i in range(2000)])
        assert _wait(lambda: (engine.generate([1, 2, 3], engine.cfg.decode), engine.stats()["records_written"])[1] >= 1)
        assert not engine.stats()["record_store_full"]
        engine.stop()
    finally:
        server.stop()


def test_cancel_stops_an_active_request_and_forgets_finished_ones():
    from serving.engine import Cancelled

    target = tiny_target()
    engine = ServingEngine(TideConfig(), "r0", target, new_head(target, 64), 0)
    params = engine.decode_params(max_new_tokens=60)
    seen = []

    def on_tokens(tokens):
        seen.extend(tokens)
        engine.cancel("req-1")  # the client goes away after the first tokens

    with pytest.raises(Cancelled):
        engine.generate([1, 2, 3], params, request_id="req-1", on_tokens=on_tokens)
    assert 0 < len(seen) < 60 and engine.stats()["requests_cancelled"] == 1
    engine.cancel("req-1")  # already over: nothing is remembered
    assert not engine._jobs
    assert len(engine.generate([1, 2, 3], params, request_id="req-1")["tokens"]) > 0


def test_answer_stream_fans_out_to_every_reader_and_stays_bounded(redis_server):
    client = connect(redis_server.url)
    stream = RedisAnswerStream(client, "ans", budget_bytes=4000)
    assert stream.read("0", 10, block_ms=0) == []  # no stream yet: nothing, at once
    t0 = time.perf_counter()
    assert stream.read("0", 10, block_ms=200) == []
    assert time.perf_counter() - t0 >= 0.15  # it waited for an entry
    for i in range(600):
        stream.append(answer_to_bytes("r0/x", [], [i % 90]))
    everything = stream.read("0", 1000, block_ms=0)
    assert stream.stats()["bytes"] <= 4000 and 0 < len(everything) < 600
    assert answer_from_bytes(everything[-1][1], 96, 8) == ("r0/x", [], [599 % 90])
    # every reader gets every entry after the id it last read (no group, no acks)
    last = everything[-1][0]
    assert stream.read(last, 10, block_ms=0) == []
    stream.append(b"new")
    assert stream.read(last, 10, block_ms=0)[0][1] == b"new" == stream.read(last, 10, block_ms=0)[0][1]


def test_answer_sharing_survives_redis_down_and_back(tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    target = tiny_target()
    cfg = TideConfig()
    cfg.decode.max_new_tokens, cfg.decode.history_k, cfg.serving.capture = 12, 4, False

    def engine(replica):
        e = ServingEngine(cfg, replica, target, new_head(target, 64), 0,
                          answers=RedisAnswerStream(connect(url, timeout_s=0.5), "t"))
        e._answer_writer.retry_s = 0.2
        return e

    a, b = engine("r0"), engine("r1")
    b.sync_answers()  # Redis down at start: the replica starts with its own (empty) history
    b.start_answer_sync(retry_s=0.2)
    expected = target_generate(target, [1, 2, 3], cfg.decode).tokens
    try:
        assert a.generate([1, 2, 3], cfg.decode)["tokens"] == expected  # serves; the answer is dropped
        assert _wait(lambda: a.stats()["history_shared_dropped"] == 1)
        server = start_redis(tmp_path / "r", port=port, password=None)
        try:
            time.sleep(0.3)
            assert a.generate([1, 2, 3], cfg.decode)["tokens"] == expected
            assert _wait(lambda: b.stats_["history_shared_in"] == 1)  # b's thread reconnected
        finally:
            server.stop()
        assert b.generate([1, 2, 3], cfg.decode)["tokens"] == expected  # Redis gone again: still serving
    finally:
        a.stop()
        b.stop()
