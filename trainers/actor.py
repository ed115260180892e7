"""The online trainer as a Ray actor: a training loop in a thread, stats on request.

Started with max_restarts=-1: after a crash Ray restarts it, and it resumes from the newest
published draft in Redis (serving keeps the last good draft meanwhile)."""

from __future__ import annotations

import logging
import os
import threading

import ray
import torch

from tide.config import from_dict
from tide.malloc import bound_heap
from tide.models import load_target
from tide.transport.redis_transport import RedisLoadBoard, RedisRecordStream, RedisWeightChannel, connect
from trainers.online import OnlineTrainer


def lower_priority(niceness: int) -> int:
    """Run this process at least this nice (never raised back: that needs privileges), so that
    where the trainer shares cores with serving the OS scheduler serves first. Returns the
    niceness in effect."""
    now = os.nice(0)
    if niceness > now:
        now = os.nice(niceness - now)
    return now


@ray.remote(max_concurrency=4)
class TrainerActor:
    def __init__(self, cfg: dict, redis_url: str, weights_key: str | None = None):
        bound_heap(arenas=2, mmap_threshold=4 << 20)  # see tide/malloc.py
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.cfg = from_dict(cfg)
        lower_priority(self.cfg.online.niceness)
        torch.set_num_threads(max(1, self.cfg.online.threads))
        client = connect(redis_url, timeout_s=5.0)
        rc = self.cfg.redis
        target = load_target(self.cfg.model, self.cfg.draft.feature_layers)
        self.metrics: list[dict] = []
        self._lock = threading.Lock()
        weights = RedisWeightChannel(client, rc.prefix, rc.keep_versions,
                                     bytes.fromhex(weights_key) if weights_key else None)
        self.trainer = OnlineTrainer(self.cfg, target, RedisRecordStream(client, rc.prefix, rc.records_mb << 20),
                                     weights, consumer=f"trainer-{os.getpid()}",
                                     on_metrics=self._collect, load=RedisLoadBoard(client, rc.prefix))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="online-trainer", daemon=True)
        self._thread.start()

    def _loop(self):
        torch.set_num_threads(max(1, self.cfg.online.threads))  # per OS thread (OpenMP)
        try:
            self.trainer.run(self._stop)
        except Exception:
            logging.exception("trainer loop died; exiting so that Ray restarts the actor")
            os._exit(1)

    def _collect(self, m: dict) -> None:
        with self._lock:
            self.metrics.append(m)
            del self.metrics[:-1000]

    def ready(self) -> dict:
        return {"version": self.trainer.version}

    def stats(self) -> dict:
        return self.trainer.stats()

    def drain_metrics(self) -> list[dict]:
        """Metrics since the last call, for the controller's W&B run."""
        with self._lock:
            out, self.metrics = self.metrics, []
        return out

    def crash(self) -> None:
        """For fault tests: die like a real crash would."""
        os._exit(1)
