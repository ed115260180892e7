"""Which replica takes a request: the least loaded of those that are up, with a bounded queue each.

A replica is marked down when a call to it fails because its actor died or is restarting (Ray
restarts serving actors, `max_restarts=-1`), and up again when a probe of it answers. Requests
never go to a replica that is down; with none up the answer is a retryable 503.
"""

from __future__ import annotations

import asyncio
import logging
import time

from serving.requests import ApiError

log = logging.getLogger(__name__)


class Router:
    def __init__(self, actors: list, max_queue: int):
        self.actors = actors
        self.max_queue = max_queue
        self.inflight = [0] * len(actors)
        self.down_since: list[float | None] = [None] * len(actors)
        self.restarts = [0] * len(actors)  # times each was seen down, then up again

    def acquire(self) -> int:
        live = [j for j in range(len(self.actors)) if self.down_since[j] is None]
        if not live:
            raise ApiError(503, "no replica is serving (restarting); retry shortly", "service_unavailable",
                           retry_after_s=5)
        i = min(live, key=lambda j: self.inflight[j])
        if self.inflight[i] > self.max_queue:  # a replica's batch and its waiting requests
            raise ApiError(429, "all replicas are busy; retry later", "rate_limit_error", retry_after_s=1)
        self.inflight[i] += 1
        return i

    def release(self, i: int) -> None:
        self.inflight[i] -= 1

    def mark_down(self, i: int, why: str) -> None:
        if self.down_since[i] is None:
            self.down_since[i] = time.time()
            log.warning("replica %d is down (%s); routing around it", i, why)

    def mark_up(self, i: int) -> None:
        if self.down_since[i] is not None:
            log.info("replica %d is back after %.1f s", i, time.time() - self.down_since[i])
            self.down_since[i] = None
            self.restarts[i] += 1

    def health(self) -> dict:
        up = sum(d is None for d in self.down_since)
        state = "ok" if up == len(self.actors) else "degraded" if up else "down"
        return {"status": state, "replicas_up": up, "replicas": [
            {"replica": i, "up": d is None, "inflight": self.inflight[i], "restarts": self.restarts[i],
             **({"down_for_s": round(time.time() - d, 1)} if d is not None else {})}
            for i, d in enumerate(self.down_since)]}

    async def probe(self, timeout_s: float = 2.0) -> None:
        """Ask every replica whether it is alive: a dead one is marked down before a request
        finds out, a restarted one up. A slow answer (a busy replica) changes nothing."""
        import ray

        async def one(i: int):
            try:
                await asyncio.wait_for(self.actors[i].ready.remote(), timeout_s)
                self.mark_up(i)
            except ray.exceptions.RayActorError as e:
                self.mark_down(i, type(e).__name__)
            except (asyncio.TimeoutError, ray.exceptions.RayError):
                pass

        await asyncio.gather(*(one(i) for i in range(len(self.actors))))
