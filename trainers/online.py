"""The online trainer: consume served records, decide when training is worth it, publish drafts.

Selective training (after TIDE, arXiv:2602.05145): a short and a long exponential moving
average of served acceptance length. Training runs while
  - drift: short < long - drift_margin (traffic or target changed, acceptance fell), or
  - acceptance is below the goal (goal_accept_len), until the eval gate has rejected
    `patience` candidates in a row (more training is not paying off; it resumes on drift).
Eval gate: every `eval_every` steps the candidate and the serving draft are scored on the same
held-out records (simulated acceptance length, tide's train step metrics); the candidate is
published as the next version only if it wins by `gate_margin`.
Idle compute (TLT): while they all idle the trainer trains at full speed; while any replica is
serving requests (the load board) it trains only the share of the time that speculation earns
them (gain - 1: what drafting saves pays for it), between `busy_share_min` and `busy_share`, and
sleeps the rest: with a draft that earns nothing, serving loses almost nothing to it.
Training uses the same `train_step` as the offline warm start; only the batch source differs:
half of each batch from the newest records (the traffic as it is now), half replayed from the
buffer, at `online.lr` (fine-tuning a warm head at the warm start's rate undid it).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import threading
import time
from collections import deque

import torch

from tide.checkpoint import (
    WeightError,
    load_draft,
    new_head,
    state_from_bytes,
    state_to_bytes,
    swap_in_place,
    validate_state,
)
from tide.config import TideConfig
from tide.models import Target
from tide.records import HiddenStateRecord, RecordError
from tide.transport.base import TransportError
from trainers.train_step import evaluate, make_batches, make_optimizer, train_step

log = logging.getLogger(__name__)


def _nbytes(rec: HiddenStateRecord) -> int:
    return sum(t.numel() * t.element_size() for t in (rec.input_ids, rec.features, rec.final_hidden))


class DriftDetector:
    def __init__(self, short: float, long: float, margin: float, warmup: int = 8):
        self.a_short, self.a_long, self.margin, self.warmup = short, long, margin, warmup
        self.short: float | None = None
        self.long: float | None = None
        self.n = 0

    def update(self, x: float) -> None:
        self.n += 1
        self.short = x if self.short is None else (1 - self.a_short) * self.short + self.a_short * x
        self.long = x if self.long is None else (1 - self.a_long) * self.long + self.a_long * x

    @property
    def drift(self) -> bool:
        return self.n >= self.warmup and self.short < self.long * (1 - self.margin)


class OnlineTrainer:
    def __init__(self, cfg: TideConfig, target: Target, stream, weights, consumer: str = "trainer-0",
                 on_metrics=None, load=None):
        self.cfg, self.target, self.stream, self.weights = cfg, target, stream, weights
        self.load = load  # a LoadBoard: replicas serving now (None: never yield)
        self.train_s = {"busy": 0.0, "idle": 0.0}  # time spent training while serving was busy / idle
        self.yielded_s = 0.0  # time spent not training because serving was busy
        self.share_now = cfg.online.busy_share  # the share of busy time it last allowed itself
        self.consumer, self.on_metrics = consumer, on_metrics or (lambda m: None)
        self.head, self.version = self._initial_head()
        self.head.float()
        self.serving_head = copy.deepcopy(self.head)  # what the replicas serve: the gate's bar
        self.rows = target.lm_head_weight[self.head.target_ids].float()
        self.opt = make_optimizer(self.head, cfg.online.lr, cfg.train.weight_decay)
        oc = cfg.online
        self.buffer: deque[HiddenStateRecord] = deque()
        self.buffer_bytes = 0
        # held-out records with their arrival index; the gate judges on those since `gate_from`
        self.holdout: deque[tuple[int, HiddenStateRecord]] = deque(maxlen=oc.holdout_records)
        self.gate_from = 0
        self.drift = DriftDetector(oc.ema_short, oc.ema_long, oc.drift_margin)
        self.rng = random.Random(cfg.train.seed)
        self.steps = 0
        self.records_in = 0
        self.records_bad = 0  # malformed, foreign or unusable records: skipped
        self.errors = 0  # loop iterations that failed for any other reason
        self.rejections_in_a_row = 0
        self.drift_events = 0
        self._was_drifting = False
        self.last_gate: dict | None = None
        self.last_train: dict | None = None
        self.published: list[dict] = []

    def _initial_head(self):
        """Resume from the newest published draft; else the configured checkpoint; else fresh."""
        try:
            latest = self.weights.latest_version()
            got = self.weights.fetch(latest) if latest else None
        except (TransportError, WeightError) as e:
            log.warning("no usable published draft at start (%s); starting from config", e)
            latest, got = 0, None
        if self.cfg.draft.path:
            head, version = load_draft(self.cfg.draft.path, self.target)
        else:
            head, version = new_head(self.target, self.cfg.draft.vocab_size, seed=self.cfg.draft.seed), 0
        if got is not None:
            try:
                state = state_from_bytes(got[0])
                validate_state(head, state)
            except WeightError as e:  # what replicas reject too: they serve the configured draft
                log.warning("published draft v%d is unusable (%s); starting from config", latest, e)
                return head, max(version, latest)
            swap_in_place(head, state)
            version = latest
            log.info("resuming from published draft v%d", latest)
        return head, version

    # -- input ------------------------------------------------------------------------------
    def ingest(self, block_ms: int = 200, count: int = 32) -> int:
        items = self.stream.read(self.consumer, count, block_ms)
        for _id, data in items:
            try:
                rec = HiddenStateRecord.from_bytes(data)
                self._check(rec)
            except RecordError as e:  # skipped and counted, never fatal
                self.records_bad += 1
                log.warning("skipping bad record %s: %s", _id, e)
                continue
            self.records_in += 1
            if rec.accept_len > 0:
                self.drift.update(rec.accept_len)
                self._check_drift()
            # random, not every n-th: cyclic traffic would always hold out the same prompts
            held = len(self.gate_records()) < 2 or self.rng.random() < 1.0 / self.cfg.online.holdout_every
            if held:
                self.holdout.append((self.records_in, rec))
            else:
                self._buffer(rec)
        self.stream.ack([i for i, _ in items])
        return len(items)

    def _check(self, rec: HiddenStateRecord) -> None:
        """A record this trainer can learn from: this target, its widths, its vocabulary, finite."""
        H = self.target.model.config.hidden_size
        vocab = self.target.embed.num_embeddings
        if rec.target_model_id != self.target.model_id:
            raise RecordError(f"written by target {rec.target_model_id!r}, not {self.target.model_id!r}")
        if rec.features.dim() != 2 or rec.features.shape[1] != 3 * H or rec.final_hidden.shape[-1] != H:
            raise RecordError(f"widths {tuple(rec.features.shape)}, {tuple(rec.final_hidden.shape)} do not fit "
                              f"hidden size {H}")
        if rec.num_positions < 1 or not 0 <= rec.prompt_len <= rec.num_positions:
            raise RecordError(f"{rec.num_positions} positions, prompt_len {rec.prompt_len}")
        ids = rec.input_ids
        if ids.dtype not in (torch.int64, torch.int32) or ids.min() < 0 or ids.max() >= vocab:
            raise RecordError(f"token ids outside the vocabulary of {vocab}")
        if not (torch.isfinite(rec.features).all() and torch.isfinite(rec.final_hidden).all()):
            raise RecordError("non-finite hidden states")
        if not math.isfinite(rec.accept_len) or rec.accept_len < 0:
            raise RecordError(f"acceptance length {rec.accept_len}")

    def _buffer(self, rec: HiddenStateRecord) -> None:
        """Into the replay buffer, the oldest out past online.buffer_mb (or buffer_records)."""
        self.buffer.append(rec)
        self.buffer_bytes += _nbytes(rec)
        while len(self.buffer) > 1 and (self.buffer_bytes > self.cfg.online.buffer_mb << 20
                                        or len(self.buffer) > self.cfg.online.buffer_records):
            self.buffer_bytes -= _nbytes(self.buffer.popleft())

    def _check_drift(self) -> None:
        if self.drift.drift and not self._was_drifting:
            self.drift_events += 1
            self.rejections_in_a_row = 0  # new traffic: training is worth trying again
            # the gate judges candidates on the new traffic only (the records the short average
            # reacted to and later ones), not on a holdout still full of the old domain
            self.gate_from = max(0, self.records_in - self.cfg.online.drift_lookback)
            log.info("drift: short-term acceptance %.2f fell %.0f%%+ below long-term %.2f", self.drift.short,
                     100 * self.cfg.online.drift_margin, self.drift.long)
            self.on_metrics({"trainer/drift_event": self.drift_events})
        self._was_drifting = self.drift.drift

    # -- control ----------------------------------------------------------------------------
    def should_train(self) -> bool:
        oc = self.cfg.online
        if not oc.enabled or len(self.buffer) < oc.min_records or len(self.gate_records()) < 2:
            return False
        if self.drift.drift:
            return True
        below_goal = self.drift.short is None or self.drift.short < oc.goal_accept_len
        return below_goal and self.rejections_in_a_row < oc.patience

    def sample_batch(self, n: int) -> list[HiddenStateRecord]:
        """Half from the newest `recent_records` (what traffic looks like now), half from the
        whole buffer (replay), without repeats."""
        records = list(self.buffer)
        n = min(n, len(records))
        recent = records[-self.cfg.online.recent_records :]
        picked = self.rng.sample(range(len(records) - len(recent), len(records)), min((n + 1) // 2, len(recent)))
        taken = set(picked)
        picked += self.rng.sample([i for i in range(len(records)) if i not in taken], n - len(picked))
        return [records[i] for i in picked]

    def train_once(self) -> dict | None:
        tc = self.cfg.train
        sample = self.sample_batch(tc.batch_size)
        batch = next(make_batches(sample, tc.seq_len, tc.batch_size, self.rng), None)
        if batch is None:  # these records hold no window with generated tokens
            return None
        m = train_step(self.head, self.target.embed, self.rows, batch, self.opt, tc.ttt_steps, tc.grad_clip)
        self.steps += 1
        self.last_train = m
        self.on_metrics({"trainer/loss": m["loss"], "trainer/sim_accept_len": m["sim_accept_len"],
                         "trainer/step": self.steps,
                         **{f"trainer/acc_{i}": a for i, a in enumerate(m["acc"])}})
        if self.steps % self.cfg.online.eval_every == 0:
            self.gate()
        return m

    def gate_records(self) -> list[HiddenStateRecord]:
        """The held-out records the eval gate uses: the newest ones, since the last drift."""
        return [r for i, r in self.holdout if i > self.gate_from]

    def gate(self) -> bool:
        tc, holdout = self.cfg.train, self.gate_records()
        cand = evaluate(self.head, self.target.embed, self.rows, holdout, tc.ttt_steps, tc.seq_len)
        serv = evaluate(self.serving_head, self.target.embed, self.rows, holdout, tc.ttt_steps, tc.seq_len)
        win = cand["sim_accept_len"] > serv["sim_accept_len"] + self.cfg.online.gate_margin
        self.last_gate = {"candidate": round(cand["sim_accept_len"], 4),
                          "serving": round(serv["sim_accept_len"], 4), "published": win,
                          "step": self.steps, "at": time.time()}
        self.on_metrics({"trainer/gate_candidate": cand["sim_accept_len"],
                         "trainer/gate_serving": serv["sim_accept_len"], "trainer/gate_published": int(win)})
        if not win:
            self.rejections_in_a_row += 1
            return False
        self.rejections_in_a_row = 0
        self.publish()
        return True

    def publish(self) -> None:
        # above anything on the channel (an operator may have published; the pointer only
        # moves forward), so the new draft is always the one replicas swap to
        version = max(self.version, self.weights.latest_version()) + 1
        meta = {"version": version, "published_at": time.time(), "train_steps": self.steps,
                "gate": self.last_gate, "target_model_id": self.target.model_id}
        self.weights.publish(version, state_to_bytes(self.head), meta)
        self.version = version
        self.serving_head.load_state_dict(self.head.state_dict())
        self.published.append({"version": version, "at": meta["published_at"], "step": self.steps})
        self.on_metrics({"trainer/published_version": version})
        log.info("published draft v%d (held-out sim. acceptance %s)", version, self.last_gate)

    def busy_share(self) -> float:
        """The share of the time to train while serving is busy: what speculation earns the
        replicas (their lowest gain - 1), between online.busy_share_min and online.busy_share;
        the least where they report none or the board cannot be read."""
        o = self.cfg.online
        if o.busy_share >= 1 or self.load is None:
            return o.busy_share
        try:
            gain = self.load.gain()
        except TransportError:
            gain = None
        earned = 0.0 if gain is None else gain - 1
        self.share_now = min(o.busy_share, max(o.busy_share_min, earned))
        return self.share_now

    def serving_busy(self) -> bool:
        """Whether a replica is serving requests now (unknown counts as busy: serving first)."""
        if self.load is None or self.cfg.online.busy_share >= 1:
            return False
        try:
            return self.load.busy() > 0
        except TransportError:
            return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.ingest(block_ms=50 if self.should_train() else 500)
                if not self.should_train():
                    continue
                busy = self.serving_busy()
                share = self.busy_share() if busy else 1.0
                if busy and share <= 0:
                    self.yielded_s += 0.1
                    stop.wait(0.1)
                    continue
                t0 = time.monotonic()
                self.train_once()
                spent = time.monotonic() - t0
                self.train_s["busy" if busy else "idle"] += spent
                if not busy and self.serving_busy():  # serving started during the step
                    share = self.busy_share()
                if share < 1:  # keep to the share of the time while serving
                    pause = spent * (1 - share) / share if share > 0 else spent
                    self.yielded_s += pause
                    stop.wait(pause)
            except TransportError as e:
                log.warning("redis unreachable, retrying: %s", e)
                stop.wait(1.0)
            except Exception:  # noqa: BLE001 - one bad step must not become a crash loop
                self.errors += 1
                log.exception("training step failed; training on")
                stop.wait(1.0)

    def stats(self) -> dict:
        return {
            "trainer_step": self.steps, "version": self.version, "records_in": self.records_in, "pid": os.getpid(),
            "records_bad": self.records_bad, "errors": self.errors, "buffer": len(self.buffer),
            "buffer_mb": round(self.buffer_bytes / 2**20, 1), "holdout": len(self.gate_records()),
            "training": self.should_train(), "drift": self.drift.drift, "drift_events": self.drift_events,
            "ema_short": self.drift.short, "ema_long": self.drift.long, "last_gate": self.last_gate,
            "last_loss": self.last_train["loss"] if self.last_train else None,
            "published": self.published[-20:], "enabled": self.cfg.online.enabled,
            "train_s_busy": round(self.train_s["busy"], 1), "train_s_idle": round(self.train_s["idle"], 1),
            "yielded_s": round(self.yielded_s, 1), "serving_busy": self.serving_busy(),
            "busy_share": self.share_now,
        }
