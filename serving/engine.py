"""One serving replica without Ray: target + draft head, admission, hot swap, capture, stats.

Requests decode together (tide.batch): a loop thread admits waiting requests into the batch's
free slots between steps, and each step advances every running request by one target pass
(`serving.max_batch` rows, fewer where `serving.kv_cache_mb` holds fewer; `serving.max_queue`
more wait). Every row drafts what the replica's speculation policy picks for it, priced for the
whole batch (tide.policy; its costs measured when the replica starts). A new draft is fetched
and validated by the weight poller, then swapped in between two steps: a response reports the
draft versions it used, and its tokens are the target's whatever drafted them. A rejected
update leaves the old draft serving.

The answer history (decode.history_k > 0) is shared: each answer served is sent to an
AnswerStream, and a thread reads the other replicas' answers from it into a queue that is
learned between steps (the history, like the head, only changes under the decode lock).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from tide.batch import SLACK, BatchDecoder, Cancelled, Request, Row
from tide.checkpoint import WeightError, load_draft, new_head, state_from_bytes, swap_in_place, validate_state
from tide.config import DecodeConfig, TideConfig
from tide.errors import TideError
from tide.kvslots import SlotCache
from tide.lookup import HistoryError, answer_from_bytes, answer_to_bytes, history_from_config
from tide.models import Target, load_target
from tide.policy import policy_from_config
from tide.records import HiddenStateRecord
from tide.transport.base import TransportError

log = logging.getLogger(__name__)
ANSWERS_PER_READ = 256


class Overloaded(TideError):
    """The replica's queue is full; the client should retry later (HTTP 429)."""


@dataclass
class _Job:
    req: Request
    versions: list[int]  # the draft versions it decoded with
    row: Row | None = None  # its row once admitted to the batch
    error: BaseException | None = None  # failed before it got a row
    done: threading.Event = field(default_factory=threading.Event)


class ServingEngine:
    def __init__(self, cfg: TideConfig, replica: str, target: Target, head, version: int,
                 writer=None, weights=None, answers=None, policy=None):
        self.cfg, self.replica, self.target = cfg, replica, target
        self.head, self.version = head, version
        self.writer, self.weights = writer, weights
        self.policy = policy  # None: each request follows its own decode parameters (FixedPolicy)
        self._pending: tuple[int, dict, dict] | None = None  # a validated draft waiting for a pass
        self._pending_lock = threading.Lock()  # the poller sets it, the decoding request takes it
        self._swap_latencies: deque[float] = deque(maxlen=100)  # the newest swaps' publish -> serving
        self._decode_lock = threading.Lock()  # the batch steps, swaps and history learning under it
        self._admit_lock = threading.Lock()
        self._wake = threading.Condition(self._admit_lock)
        self._queue: deque[_Job] = deque()  # admitted to the replica, waiting for a slot
        self._jobs: dict[str, _Job] = {}  # every request in the replica, waiting or decoding
        self._rejected_versions: set[int] = set()
        self._stop = threading.Event()
        self._looping = False

        # earlier answers draft later requests (decode.history_k > 0), in memory; with an
        # AnswerStream (serving.history_share) every replica's answers, else this one's
        self.history = history_from_config(cfg)
        sc = cfg.serving
        slots = max(1, min(sc.max_batch, (sc.kv_cache_mb << 20) // SlotCache.slot_bytes(
            target.config, cfg.model.max_context + SLACK, target.dtype)))
        self.decoder = BatchDecoder(target, head, slots, cfg.model.max_context, policy, self.history,
                                    sc.prefill_chunk, sc.speculative)
        self.answers = answers if self.history is not None and cfg.serving.history_share else None
        self._answer_writer = None
        if self.answers is not None:
            from serving.record_writer import AsyncRecordWriter

            self._answer_writer = AsyncRecordWriter(self.answers, cfg.serving.record_queue, what="answer")
        # this process's answers carry its own id: a replica skips them when it reads the stream,
        # but learns those of an earlier life under the same replica name
        self._source = f"{replica}/{uuid.uuid4().hex[:8]}"
        self._answers_after = "0"  # the last stream id read
        # peers' answers read but not learned yet; bounded: a replica that decodes one long
        # request while its peers serve more than this drops the oldest (the newest draft best)
        self._shared: deque[tuple[list[int], list[int]]] = deque(maxlen=4 * ANSWERS_PER_READ)
        k = cfg.decode.k
        self.stats_ = {
            "requests_ok": 0, "requests_failed": 0, "requests_rejected": 0,
            "requests_cancelled": 0, "generated_tokens": 0, "prompt_tokens": 0, "drafts": 0, "draft_tokens": 0,
            "accepted_tokens": 0, "accepted_per_pos": [0] * k, "decode_s": 0.0,
            "history_passes": 0, "history_accepted": 0, "history_shared_in": 0,
            "history_shared_bad": 0,
            "accept_len_ema": None, "swaps_applied": 0, "swaps_rejected": 0,
            "last_swap_latency_s": None, "last_swap_at": None, "last_swap_error": None,
        }

    @classmethod
    def build(cls, cfg: TideConfig, replica: str, writer=None, weights=None, answers=None) -> ServingEngine:
        target = load_target(cfg.model, cfg.draft.feature_layers)
        if cfg.draft.path:
            head, version = load_draft(cfg.draft.path, target)
        else:
            head, version = new_head(target, cfg.draft.vocab_size, seed=cfg.draft.seed), 0
        policy = None
        if cfg.serving.threads > 0:  # costs are measured with the threads that will decode
            torch.set_num_threads(cfg.serving.threads)
        if cfg.serving.speculative:
            policy = policy_from_config(cfg.decode, target, head, cfg.model.max_context, batch=cfg.serving.max_batch)
        if policy is not None:
            log.info("replica %s: costs measured (ms) %s", replica, policy.stats()["costs_ms"])
        engine = cls(cfg, replica, target, head, version, writer, weights, answers, policy)
        engine.poll_weights()  # join a running system at its newest draft
        engine.sync_answers()  # ... and with the answers its replicas served
        return engine

    # -- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        from tide.prompts import chat_ids

        if messages is not None:
            return chat_ids(self.target.tokenizer, messages)
        return self.target.tokenizer(prompt)["input_ids"]

    def generate(self, prompt_ids: list[int], params: DecodeConfig, request_id: str | None = None,
                 on_tokens=None) -> dict:
        """Decode one request in the replica's batch (blocks until it finishes). on_tokens(new
        ids) is called from the batch loop after every step; True ends the request ("stop")."""
        request_id = request_id or uuid.uuid4().hex
        req = Request(prompt_ids, params, request_id, on_tokens, capture=self.cfg.serving.capture)
        job = _Job(req, [self.version])
        with self._admit_lock:
            if not self._looping:
                self._looping = True
                threading.Thread(target=self._loop, name="batch-loop", daemon=True).start()
            if self._waiting_beyond_slots() >= self.cfg.serving.max_queue:  # the batch full + max_queue waiting
                self.stats_["requests_rejected"] += 1
                raise Overloaded(f"replica {self.replica} has {len(self._queue)} requests queued; retry later")
            self._queue.append(job)
            self._jobs[request_id] = job
            self._wake.notify()
        job.done.wait()
        with self._admit_lock:
            self._jobs.pop(request_id, None)
        row = job.row
        if row is None or row.error is not None:
            err = job.error if row is None else row.error
            self.stats_["requests_cancelled" if isinstance(err, Cancelled) else "requests_failed"] += 1
            raise err
        g, versions = row.g, job.versions
        elapsed = time.perf_counter() - row.started
        self._account(g, elapsed, len(prompt_ids))
        if g.features is not None and self.writer is not None:
            # the newest draft it used: a request that saw a swap is judged with the new draft
            record = HiddenStateRecord(
                request_id=request_id, target_model_id=self.target.model_id, draft_version=versions[-1],
                input_ids=torch.tensor(g.sequence), features=g.features,
                final_hidden=g.final_hidden, prompt_len=len(prompt_ids), accept_len=g.head_accept_len)
            self.writer.submit(record.to_bytes())
        return {
            "request_id": request_id, "tokens": g.tokens, "finish_reason": g.finish_reason,
            "prompt_tokens": len(prompt_ids), "draft_version": versions[-1], "draft_versions": versions,
            "drafted": g.drafted,
            "accepted": g.accepted, "verify_passes": g.passes,
            "accept_len": round(g.mean_accept_len, 4), "seconds": round(elapsed, 4),
            "replica": self.replica,
        }

    def _loop(self) -> None:
        """The batch loop (started by the first request): admits waiting requests between steps,
        steps the batch, hands finished requests back; swaps and the shared history's learning
        happen between steps."""
        if self.cfg.serving.threads > 0:  # OpenMP's thread count is per OS thread
            torch.set_num_threads(self.cfg.serving.threads)
        while not self._stop.is_set():
            with self._admit_lock:
                while not (self._queue or self.decoder.busy() or self._stop.is_set()):
                    self._wake.wait(0.5)
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a failed step fails its requests, never the loop
                self.stats_["loop_errors"] = self.stats_.get("loop_errors", 0) + 1
                log.exception("batch step failed; failing its requests")
                self._fail_all()

    def _step(self) -> None:
        with self._decode_lock:
            self._learn_shared()
            if self._pending is not None and self._apply_pending():
                for job in list(self._jobs.values()):
                    if job.row is not None:
                        job.versions.append(self.version)
            while self.decoder.has_room():
                with self._admit_lock:
                    job = self._queue.popleft() if self._queue else None
                if job is None:
                    break
                try:
                    job.row = self.decoder.admit(job.req)
                    job.versions[:] = [self.version]
                except Exception as e:  # noqa: BLE001 - ContextTooLong and the like: this request's
                    job.error = e
                    job.done.set()
            finished = self.decoder.step()
        for row in finished:
            job = self._jobs.get(row.req.rid)
            if row.error is None and self.history is not None:
                with self._decode_lock:
                    self.history.add(row.req.prompt, row.g.tokens)
                if self._answer_writer is not None:
                    self._answer_writer.submit(answer_to_bytes(
                        self._source, row.req.prompt[-self.history.context_tokens:], row.g.tokens))
            if job is not None:
                job.done.set()

    def _waiting_beyond_slots(self) -> int:
        """Requests queued past the batch's free slots (a burst waits a few steps to join: one
        prefill chunk per step; it is not refused for that)."""
        d = self.decoder
        free = d.slots - len(d.running) - len(d.joining)
        return len(self._queue) - max(0, free)

    def _fail_all(self) -> None:
        """After a step raised: every request in the batch fails (their caches are suspect), the
        slots start empty, and the loop goes on with the requests still waiting."""
        rows = [*self.decoder.running, *self.decoder.joining]
        self.decoder.running, self.decoder.joining = [], []
        for row in rows:
            if row.error is None:
                row.error = RuntimeError("the batch step failed; see the replica's log")
            job = self._jobs.get(row.req.rid)
            if job is not None:
                job.done.set()

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
        """Stop a request at its next step: its client is gone (one still waiting never starts).
        A request that already finished is left alone (nothing to stop, nothing to remember)."""
        with self._admit_lock:
            job = self._jobs.get(request_id)
            if job is None:
                return
            job.req.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                job.error = Cancelled(f"request {request_id} was cancelled")
                job.done.set()

    def decode_params(self, **overrides) -> DecodeConfig:
        return replace(self.cfg.decode, **{k: v for k, v in overrides.items() if v is not None})

    # -- the shared answer history -----------------------------------------------------------
    def pull_answers(self, block_ms: int = 0) -> int:
        """Queue the answers that other replicas served since the last pull (waiting up to
        block_ms for one). Returns how many stream entries were read. Raises TransportError."""
        got = self.answers.read(self._answers_after, ANSWERS_PER_READ, block_ms)
        vocab = self.target.model.get_input_embeddings().num_embeddings
        for entry_id, data in got:
            self._answers_after = entry_id
            try:
                source, context, answer = answer_from_bytes(data, vocab, self.cfg.model.max_context)
            except HistoryError as e:  # skipped, never fatal: it drafts nothing
                self.stats_["history_shared_bad"] += 1
                log.warning("skipping shared answer %s: %s", entry_id, e)
                continue
            if source != self._source:
                self._shared.append((context, answer))
        return len(got)

    def _learn_shared(self) -> None:
        """Under the decode lock: learn the queued answers of the other replicas."""
        while self._shared:
            context, answer = self._shared.popleft()
            self.history.add(context, answer)
            self.stats_["history_shared_in"] += 1

    def sync_answers(self) -> None:
        """Learn every answer the stream holds now (a replica joining learns the fleet's)."""
        if self.answers is None:
            return
        try:
            while self.pull_answers() == ANSWERS_PER_READ:
                with self._decode_lock:  # the queue holds a few reads: learn as it fills
                    self._learn_shared()
        except TransportError as e:
            log.warning("answer stream unreachable, starting with this replica's history: %s", e)
        with self._decode_lock:
            self._learn_shared()

    def start_answer_sync(self, retry_s: float = 1.0) -> None:
        """A thread that reads the other replicas' answers as they come and, when no request is
        decoding, learns them at once (else the next request does, before it starts)."""
        if self.answers is None:
            return

        def loop():
            down = False
            while not self._stop.is_set():
                try:
                    self.pull_answers(block_ms=1000)
                    if down:
                        log.info("answer stream reachable again")
                    down = False
                    if self._shared and self._decode_lock.acquire(blocking=False):
                        try:
                            self._learn_shared()
                        finally:
                            self._decode_lock.release()
                except TransportError as e:
                    if not down:
                        log.warning("answer stream unreachable, retrying: %s", e)
                    down = True
                    self._stop.wait(retry_s)
                except Exception:  # noqa: BLE001 - the sync outlives any bad entry
                    self.stats_["answer_sync_errors"] = self.stats_.get("answer_sync_errors", 0) + 1
                    log.exception("answer sync failed; syncing on")
                    self._stop.wait(retry_s)

        threading.Thread(target=loop, name="answer-sync", daemon=True).start()

    # -- hot swap ---------------------------------------------------------------------------
    def poll_weights(self) -> bool:
        """Fetch and validate the newest published draft if there is one, and swap it in now if
        no request is decoding (else the decoding request swaps it in before its next pass).
        Returns True when a new draft was swapped in by this call."""
        if self.weights is None:
            return False
        try:
            latest = self.weights.latest_version()
            pending = self._pending[0] if self._pending is not None else self.version
            if latest > max(self.version, pending) and latest not in self._rejected_versions:
                got = self.weights.fetch(latest)
                if got is not None:
                    self._validate(latest, *got)
        except WeightError as e:  # a blob whose signature or metadata is bad: never applied
            self._reject(latest, e)
        except TransportError as e:
            log.debug("weight poll failed: %s", e)
        if self._pending is not None and self._decode_lock.acquire(blocking=False):
            try:
                return self._apply_pending()
            finally:
                self._decode_lock.release()
        return False

    def _validate(self, version: int, data: bytes, meta: dict) -> None:
        try:
            # a draft's blob is the head's tensors in fp32 plus a small header: far more is not one
            # (and is not parsed: it could be anything)
            limit = 2 * sum(t.numel() * 4 for t in self.head.state_dict().values()) + (1 << 20)
            if len(data) > limit:
                raise WeightError(f"blob of {len(data)} bytes; a draft for this head is under {limit}")
            state = state_from_bytes(data)
            validate_state(self.head, state)
        except WeightError as e:
            self._reject(version, e)
            return
        with self._pending_lock:
            if self._pending is None or self._pending[0] < version:
                self._pending = (version, state, meta)

    def _reject(self, version: int, e: Exception) -> None:
        self._rejected_versions.add(version)
        self.stats_["swaps_rejected"] += 1
        self.stats_["last_swap_error"] = f"v{version}: {e}"
        log.warning("rejected draft v%d, keeping v%d: %s", version, self.version, e)

    def _apply_pending(self) -> bool:
        """Under the decode lock, between passes: swap the validated draft in, in place."""
        with self._pending_lock:
            got, self._pending = self._pending, None
        if got is None:
            return False
        version, state, meta = got
        swap_in_place(self.head, state)
        self.version = version
        if self.policy is not None:
            self.policy.head_changed()
        now = time.time()
        self.stats_["swaps_applied"] += 1
        self.stats_["last_swap_at"] = now
        if "published_at" in meta:  # publish -> serving, the poll interval and validation included
            self.stats_["last_swap_latency_s"] = round(now - float(meta["published_at"]), 4)
            self._swap_latencies.append(now - float(meta["published_at"]))
        log.info("replica %s now serves draft v%d", self.replica, version)
        return True

    def busy(self) -> bool:
        """Whether the replica holds requests (waiting or in its batch)."""
        return bool(self._queue) or self.decoder.busy()

    def start_load_marks(self, load, every_s: float = 0.5, ttl_s: float = 2.0) -> None:
        """Keep this replica's mark on the load board (tide.transport LoadBoard) while it holds
        requests, with what speculation earns it now (the controller's gain), so that a trainer
        sharing the machine trains only that share of the time (trainers/online.py); the mark
        expires by itself if this replica dies. A Redis that is slow or gone delays only this
        thread, never a request."""
        def loop():
            marked, failing = False, False
            while not self._stop.wait(every_s):
                busy = self.busy()
                gain = self.policy.gain() if hasattr(self.policy, "gain") else None
                try:
                    if busy or marked:
                        load.mark(self.replica, busy, ttl_s, gain)
                    marked, failing = busy, False
                except Exception as e:  # noqa: BLE001 - TransportError and the like: retried next tick
                    if not failing:
                        log.warning("load mark failed (retrying): %s", e)
                    failing = True

        threading.Thread(target=loop, name="load-marks", daemon=True).start()

    def start_weight_poller(self) -> None:
        def loop():
            while not self._stop.wait(self.cfg.serving.swap_poll_s):
                try:
                    self.poll_weights()
                except Exception:  # noqa: BLE001 - the poller must outlive any bad update
                    self.stats_["poller_errors"] = self.stats_.get("poller_errors", 0) + 1
                    log.exception("weight poll failed; polling on")

        threading.Thread(target=loop, name="weight-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        with self._admit_lock:
            self._wake.notify_all()
        for w in (self.writer, self._answer_writer):
            if w is not None:
                w.close()

    def stats(self) -> dict:
        s = dict(self.stats_)
        s.update(replica=self.replica, draft_version=self.version, queued=len(self._queue),
                 batch=len(self.decoder.running), slots=self.decoder.slots,
                 mean_batch=round(self.decoder.rows_stepped / max(self.decoder.steps, 1), 2),
                 kv_cache_mb=round(self.decoder.nbytes / 2**20, 1), steps=self.decoder.steps, pid=os.getpid())
        if self.writer is not None:
            s.update(records_written=self.writer.written, records_dropped=self.writer.dropped,
                     records_oversized=self.writer.oversized, record_stream_connected=self.writer.connected,
                     record_store_full=self.writer.full)
        if self.history is not None:
            s.update(history_answers=len(self.history), history_tokens=self.history.tokens)
        if self._answer_writer is not None:
            s.update(history_shared_out=self._answer_writer.written,
                     history_shared_dropped=self._answer_writer.dropped)
        if self.policy is not None:
            s["policy"] = self.policy.stats()
        if self._swap_latencies:
            lat = sorted(self._swap_latencies)
            s.update(swap_latency_p50_s=round(lat[len(lat) // 2], 3),
                     swap_latency_p99_s=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3))
        return s
