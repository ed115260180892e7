"""The serving engine without Ray or Redis: what a replica learns from the requests it serves,
and from those its peers serve."""

import threading
import time

import pytest

from serving.engine import Cancelled, Overloaded, ServingEngine
from tests.conftest import tiny_target
from tide.checkpoint import new_head, state_to_bytes
from tide.config import load_config
from tide.lookup import answer_to_bytes
from tide.speculative import target_generate
from tide.transport.memory import MemoryAnswerStream, MemoryWeightChannel


def test_a_served_answer_drafts_the_next_requests_and_a_cancelled_one_is_not_learned():
    cfg = load_config(overrides=["decode.k=2", "decode.history_k=6", "decode.max_new_tokens=24",
                                 "decode.lookup_ngram=0",
                                 "serving.capture=false"])
    target = tiny_target()
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0)
    params = engine.decode_params()

    def cancel(_tokens):
        engine.cancel("gone")

    try:
        engine.generate([7, 8, 9], params, request_id="gone", on_tokens=cancel)
    except Cancelled:
        pass
    assert len(engine.history) == 0  # a cancelled request teaches nothing
    first = engine.generate([1, 2, 3], params)
    assert engine.stats_["history_passes"] == 0 and len(engine.history) == 1
    again = engine.generate([1, 2, 3], params)
    assert again["tokens"] == first["tokens"] == target_generate(target, [1, 2, 3], params).tokens
    assert engine.stats_["history_passes"] > 0 and engine.stats_["history_accepted"] > 0
    assert again["verify_passes"] < first["verify_passes"]  # the history's chains were right


def _sharing_engine(target, answers, replica, *overrides):
    cfg = load_config(overrides=["decode.k=2", "decode.history_k=6", "decode.max_new_tokens=24",
                                 "decode.lookup_ngram=0",
                                 "serving.capture=false", *overrides])
    return ServingEngine(cfg, replica, target, new_head(target, 64), 0, answers=answers)


def _wait(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.02)
    return cond()


def test_an_answer_served_by_one_replica_drafts_on_the_others():
    target = tiny_target()
    answers = MemoryAnswerStream()
    a = _sharing_engine(target, answers, "r0")
    b = _sharing_engine(target, answers, "r1")
    b.start_answer_sync()
    try:
        first = a.generate([1, 2, 3], a.decode_params())
        assert _wait(lambda: a.stats()["history_shared_out"] == 1)
        # b learns it while idle (its sync thread takes the free decode lock)
        assert _wait(lambda: len(b.history) == 1) and b.stats_["history_shared_in"] == 1
        again = b.generate([1, 2, 3], b.decode_params())
        assert again["tokens"] == first["tokens"] == target_generate(target, [1, 2, 3], a.decode_params()).tokens
        assert b.stats_["history_passes"] > 0 and again["verify_passes"] < first["verify_passes"]
        # a skips its own answer, and learns b's
        a.sync_answers()
        assert len(a.history) == 2 and a.stats_["history_shared_in"] == 1
        # a replica that starts later (or restarts under the same name) learns every answer kept
        late = _sharing_engine(target, answers, "r0")
        late.sync_answers()
        assert len(late.history) == 2 and late.stats()["history_answers"] == 2
        # a bad entry is skipped and counted; the ones after it are still learned
        answers.append(b"not an answer")
        answers.append(answer_to_bytes("r9/x", [1], [5, 10_000]))  # outside the vocabulary
        answers.append(answer_to_bytes("r9/x", [1], [5, 6]))
        late.sync_answers()
        assert late.stats_["history_shared_bad"] == 2 and len(late.history) == 3
    finally:
        for e in (a, b):
            e.stop()


def test_history_share_false_keeps_each_replicas_history_its_own():
    target = tiny_target()
    answers = MemoryAnswerStream()
    a = _sharing_engine(target, answers, "r0", "serving.history_share=false")
    a.generate([1, 2, 3], a.decode_params())
    assert len(a.history) == 1 and a.answers is None and "history_shared_out" not in a.stats()
    assert answers.read("0", 10, 0) == []


def test_a_draft_published_mid_request_swaps_in_between_passes():
    """The weight poller validates a published draft; a request decoding at the time swaps it in
    before its next verify pass, reports both versions, and its tokens stay the target's."""
    cfg = load_config(overrides=["decode.policy=fixed", "decode.k=3", "decode.max_new_tokens=24",
                                 "serving.capture=false"])
    target = tiny_target()
    weights = MemoryWeightChannel()
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0, weights=weights)
    published = []

    def publish_once(_tokens):
        if not published:  # decoding holds the lock: the poll only validates and queues it
            weights.publish(7, state_to_bytes(new_head(target, 64, seed=7)), {"published_at": time.time()})
            published.append(engine.poll_weights())

    out = engine.generate([1, 2, 3], engine.decode_params(), on_tokens=publish_once)
    assert published == [False] and out["draft_versions"] == [0, 7] and out["draft_version"] == 7
    assert out["tokens"] == target_generate(target, [1, 2, 3], engine.decode_params()).tokens
    assert engine.version == 7 and engine.stats_["swaps_applied"] == 1
    assert engine.stats_["last_swap_latency_s"] < 1.0
    # idle: a poll swaps at once; a corrupt draft is rejected and the serving one stays
    weights.publish(8, state_to_bytes(new_head(target, 64, seed=8)), {})
    assert engine.poll_weights() and engine.version == 8
    weights.publish(9, b"not safetensors", {})
    assert not engine.poll_weights() and engine.version == 8 and engine.stats_["swaps_rejected"] == 1
    again = engine.generate([1, 2, 3], engine.decode_params())
    assert again["draft_versions"] == [8]


def test_a_burst_that_fits_the_free_slots_and_the_queue_is_served_and_one_more_is_refused():
    """Requests join one prefill per step: a burst waits for its slots, it is not refused for that.
    Refused: only what waits beyond the free slots and serving.max_queue."""
    cfg = load_config(overrides=["decode.max_new_tokens=6", "serving.capture=false", "serving.max_batch=4",
                                 "serving.max_queue=1", "serving.speculative=false"])
    target = tiny_target()
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0)
    params = engine.decode_params()
    gate, entered = threading.Event(), threading.Event()

    def hold(_tokens):  # the first request holds the batch loop: the others wait in the queue
        entered.set()
        gate.wait(10)

    results, errors = {}, []

    def call(i, cb=None):
        try:
            results[i] = engine.generate([1, 2, 3 + i], params, on_tokens=cb)["tokens"]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    first = threading.Thread(target=call, args=(0, hold))
    first.start()
    assert entered.wait(10)
    rest = [threading.Thread(target=call, args=(i,)) for i in range(1, 5)]  # 3 free slots + max_queue 1
    for t in rest:
        t.start()
    assert _wait(lambda: len(engine._queue) == 4)
    with pytest.raises(Overloaded):
        engine.generate([9, 9], params)
    gate.set()
    for t in [first, *rest]:
        t.join(30)
    assert not errors and sorted(results) == [0, 1, 2, 3, 4]
    for i, tokens in results.items():
        assert tokens == target_generate(target, [1, 2, 3 + i], params).tokens


def test_a_replica_marks_itself_busy_while_it_holds_requests_and_idle_after():
    """The trainer yields to serving by the load board (online.busy_share): a replica's mark is
    up while a request decodes and gone once it is served."""
    from tide.transport.memory import MemoryLoadBoard

    cfg = load_config(overrides=["decode.max_new_tokens=6", "serving.capture=false", "serving.speculative=false"])
    target = tiny_target()
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0)
    board = MemoryLoadBoard()
    engine.start_load_marks(board, every_s=0.05, ttl_s=5.0)
    gate, entered = threading.Event(), threading.Event()

    def hold(_tokens):
        entered.set()
        gate.wait(10)

    t = threading.Thread(target=engine.generate, args=([1, 2, 3], engine.decode_params()), kwargs={"on_tokens": hold})
    try:
        assert board.busy() == 0
        t.start()
        assert entered.wait(10) and _wait(lambda: board.busy() == 1)
        gate.set()
        t.join(10)
        assert _wait(lambda: board.busy() == 0)  # unmarked at once, not left to expire
    finally:
        gate.set()
        engine.stop()
