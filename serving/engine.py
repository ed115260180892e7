"""One serving replica without Ray: target + draft head, admission, hot swap, capture, stats.

Requests decode one at a time under `_decode_lock` (one CPU stream per replica; more replicas
scale out). A weight swap takes the same lock, so it lands between requests: every response is
produced by exactly one draft version, which it reports. Swaps validate the whole update first
(tide.checkpoint.swap_in_place); a rejected update leaves the old draft serving.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace

import torch

from tide.checkpoint import WeightError, load_draft, new_head, state_from_bytes, swap_in_place
from tide.config import DecodeConfig, TideConfig
from tide.errors import TideError
from tide.lookup import history_from_config
from tide.models import Target, load_target
from tide.records import HiddenStateRecord
from tide.speculative import speculative_generate, target_generate
from tide.transport.base import TransportError

log = logging.getLogger(__name__)


class Overloaded(TideError):
    """The replica's queue is full; the client should retry later (HTTP 429)."""


class Cancelled(TideError):
    """The client went away; decoding stopped at the next verify pass."""


class ServingEngine:
    def __init__(self, cfg: TideConfig, replica: str, target: Target, head, version: int,
                 writer=None, weights=None):
        self.cfg, self.replica, self.target = cfg, replica, target
        self.head, self.version = head, version
        self.writer, self.weights = writer, weights
        self._decode_lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self._waiting = 0
        self._rejected_versions: set[int] = set()
        self._active: set[str] = set()
        self._cancelled: set[str] = set()
        self._stop = threading.Event()
        # earlier answers draft later requests (decode.history_k > 0); per replica, in memory
        self.history = history_from_config(cfg)
        k = cfg.decode.k
        self.stats_ = {
            "requests_ok": 0, "requests_failed": 0, "requests_rejected": 0,
            "requests_cancelled": 0, "generated_tokens": 0, "prompt_tokens": 0, "drafts": 0, "draft_tokens": 0,
            "accepted_tokens": 0, "accepted_per_pos": [0] * k, "decode_s": 0.0,
            "history_passes": 0, "history_accepted": 0,
            "accept_len_ema": None, "swaps_applied": 0, "swaps_rejected": 0,
            "last_swap_latency_s": None, "last_swap_at": None, "last_swap_error": None,
        }

    @classmethod
    def build(cls, cfg: TideConfig, replica: str, writer=None, weights=None) -> ServingEngine:
        target = load_target(cfg.model, cfg.draft.feature_layers)
        if cfg.draft.path:
            head, version = load_draft(cfg.draft.path, target)
        else:
            head, version = new_head(target, cfg.draft.vocab_size, seed=cfg.draft.seed), 0
        engine = cls(cfg, replica, target, head, version, writer, weights)
        engine.poll_weights()  # join a running system at its newest draft
        return engine

    # -- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        from tide.prompts import chat_ids

        if messages is not None:
            return chat_ids(self.target.tokenizer, messages)
        return self.target.tokenizer(prompt)["input_ids"]

    def generate(self, prompt_ids: list[int], params: DecodeConfig, request_id: str | None = None,
                 on_tokens=None) -> dict:
        request_id = request_id or uuid.uuid4().hex

        def stream(tokens: list[int]) -> None:
            if request_id in self._cancelled:
                raise Cancelled(f"request {request_id} was cancelled")
            if on_tokens is not None:
                on_tokens(tokens)

        with self._admit_lock:
            if self._waiting > self.cfg.serving.max_queue:  # one decoding + max_queue waiting
                self.stats_["requests_rejected"] += 1
                raise Overloaded(f"replica {self.replica} has {self._waiting} requests queued; retry later")
            self._waiting += 1
            self._active.add(request_id)
        try:
            with self._decode_lock:
                # OpenMP's thread count is per OS thread, and Ray runs calls on pool threads
                # that start with OMP_NUM_THREADS=1: set it where the decoding happens
                if self.cfg.serving.threads > 0:
                    torch.set_num_threads(self.cfg.serving.threads)
                head, version = self.head, self.version
                t0 = time.perf_counter()
                if self.cfg.serving.speculative:
                    g = speculative_generate(self.target, head, prompt_ids, params, self.cfg.model.max_context,
                                             capture=self.cfg.serving.capture, on_tokens=stream,
                                             history=self.history)
                    if self.history is not None:
                        self.history.add(prompt_ids, g.tokens)
                else:
                    g = target_generate(self.target, prompt_ids, params, self.cfg.model.max_context,
                                        on_tokens=stream)
                elapsed = time.perf_counter() - t0
        except Cancelled:
            self.stats_["requests_cancelled"] += 1
            raise
        except Exception:
            self.stats_["requests_failed"] += 1
            raise
        finally:
            with self._admit_lock:
                self._waiting -= 1
                self._active.discard(request_id)
                self._cancelled.discard(request_id)
        self._account(g, elapsed, len(prompt_ids))
        if g.features is not None and self.writer is not None:
            record = HiddenStateRecord(
                request_id=request_id, target_model_id=self.target.model_id, draft_version=version,
                input_ids=torch.tensor(g.sequence), features=g.features,
                final_hidden=g.final_hidden, prompt_len=len(prompt_ids), accept_len=g.head_accept_len)
            self.writer.submit(record.to_bytes())
        return {
            "request_id": request_id, "tokens": g.tokens, "finish_reason": g.finish_reason,
            "prompt_tokens": len(prompt_ids), "draft_version": version, "drafted": g.drafted,
            "accepted": g.accepted, "verify_passes": g.passes,
            "accept_len": round(g.mean_accept_len, 4), "seconds": round(elapsed, 4),
            "replica": self.replica,
        }

    def _account(self, g, elapsed: float, prompt_len: int) -> None:
        s = self.stats_
        s["requests_ok"] += 1
        s["generated_tokens"] += len(g.tokens)
        s["prompt_tokens"] += prompt_len
        s["drafts"] += g.passes
        s["draft_tokens"] += g.drafted
        s["accepted_tokens"] += g.accepted
        s["accepted_per_pos"] = [a + b for a, b in zip(s["accepted_per_pos"], g.accepted_per_pos)]
        s["history_passes"] += g.history_passes
        s["history_accepted"] += g.history_accepted
        s["decode_s"] += elapsed
        if g.passes:
            ema = s["accept_len_ema"]
            s["accept_len_ema"] = g.mean_accept_len if ema is None else 0.8 * ema + 0.2 * g.mean_accept_len

    def cancel(self, request_id: str) -> None:
        """Stop a request at its next verify pass: its client is gone. A request that already
        finished is left alone (nothing to stop, nothing to remember)."""
        with self._admit_lock:
            if request_id in self._active:
                self._cancelled.add(request_id)

    def decode_params(self, **overrides) -> DecodeConfig:
        return replace(self.cfg.decode, **{k: v for k, v in overrides.items() if v is not None})

    # -- hot swap ---------------------------------------------------------------------------
    def poll_weights(self) -> bool:
        """Swap in the newest published draft if there is one. Returns True when swapped."""
        if self.weights is None:
            return False
        try:
            latest = self.weights.latest_version()
            if latest <= self.version or latest in self._rejected_versions:
                return False
            got = self.weights.fetch(latest)
        except TransportError as e:
            log.debug("weight poll failed: %s", e)
            return False
        if got is None:
            return False
        data, meta = got
        try:
            state = state_from_bytes(data)
            with self._decode_lock:  # between requests: no response mixes two drafts
                swap_in_place(self.head, state)
                self.version = latest
        except WeightError as e:
            self._rejected_versions.add(latest)
            self.stats_["swaps_rejected"] += 1
            self.stats_["last_swap_error"] = f"v{latest}: {e}"
            log.warning("rejected draft v%d, keeping v%d: %s", latest, self.version, e)
            return False
        now = time.time()
        self.stats_["swaps_applied"] += 1
        self.stats_["last_swap_at"] = now
        if "published_at" in meta:
            self.stats_["last_swap_latency_s"] = round(now - float(meta["published_at"]), 4)
        log.info("replica %s now serves draft v%d", self.replica, latest)
        return True

    def start_weight_poller(self) -> None:
        def loop():
            while not self._stop.wait(self.cfg.serving.swap_poll_s):
                self.poll_weights()

        threading.Thread(target=loop, name="weight-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self.writer is not None:
            self.writer.close()

    def stats(self) -> dict:
        s = dict(self.stats_)
        s.update(replica=self.replica, draft_version=self.version, queued=self._waiting)
        if self.writer is not None:
            s.update(records_written=self.writer.written, records_dropped=self.writer.dropped,
                     record_stream_connected=self.writer.connected)
        return s
