"""Routing around replicas that are down, without Ray or HTTP."""

import pytest

from serving.requests import ApiError
from serving.router import Router


def test_routes_to_the_least_loaded_replica_that_is_up():
    r = Router(["a", "b", "c"], max_queue=1)
    assert [r.acquire() for _ in range(3)] == [0, 1, 2]
    r.mark_down(1, "ActorDiedError")
    assert r.health()["status"] == "degraded" and r.health()["replicas_up"] == 2
    assert {r.acquire(), r.acquire()} == {0, 2}  # never the dead one, even with fewer in flight
    with pytest.raises(ApiError) as full:  # 0 and 2 hold 2 each: one decoding + max_queue waiting
        r.acquire()
    assert full.value.status == 429 and full.value.retry_after_s
    r.mark_up(1)
    assert r.acquire() == 1 and r.health()["replicas"][1]["restarts"] == 1


def test_no_replica_up_is_a_retryable_503():
    r = Router(["a"], max_queue=4)
    r.mark_down(0, "ActorUnavailableError")
    with pytest.raises(ApiError) as e:
        r.acquire()
    assert e.value.status == 503 and e.value.retry_after_s and r.health()["status"] == "down"
    r.mark_up(0)
    assert r.acquire() == 0
    r.release(0)
    assert r.inflight == [0]
