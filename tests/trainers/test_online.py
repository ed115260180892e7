"""The online trainer's control logic with in-memory transports and a tiny target."""

import os
from dataclasses import replace

import pytest
import torch

from tests.conftest import tiny_target
from tide.checkpoint import new_head, state_from_bytes
from tide.config import DecodeConfig, TideConfig
from tide.records import HiddenStateRecord
from tide.speculative import speculative_generate
from tide.transport.memory import MemoryRecordStream, MemoryWeightChannel
from trainers.online import DriftDetector, OnlineTrainer


def test_drift_fires_when_short_average_falls_below_long():
    d = DriftDetector(short=0.3, long=0.02, margin=0.1, warmup=8)
    for _ in range(50):
        d.update(3.0)
    assert not d.drift
    for _ in range(5):
        d.update(1.5)
    assert d.drift and d.short < 0.9 * d.long
    for _ in range(200):
        d.update(1.5)
    assert not d.drift  # the long average catches up: the new level is the norm


def _records(target, head, n, seed=0, distinct=4):
    """A repetitive workload: n requests over `distinct` prompts (learnable, even held out)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 90, (6,), generator=gen).tolist() for _ in range(distinct)]
    out = []
    for i in range(n):
        prompt = prompts[i % distinct]
        g = speculative_generate(target, head, prompt, DecodeConfig(k=3, max_new_tokens=24), capture=True)
        out.append(HiddenStateRecord(request_id=str(i), target_model_id=target.model_id, draft_version=0,
                                     input_ids=torch.tensor(g.sequence), features=g.features,
                                     final_hidden=g.final_hidden, prompt_len=6, accept_len=g.mean_accept_len))
    return out


def test_trains_gates_and_publishes_from_a_stream():
    target = tiny_target(init=0.3)  # peaked next-token distributions: something to learn
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.train.batch_size, cfg.train.ttt_steps, cfg.train.lr = 4, 2, 5e-3
    o = cfg.online
    o.min_records, o.eval_every, o.gate_margin, o.holdout_every, o.goal_accept_len = 4, 10, 0.0, 4, 100.0
    stream, weights = MemoryRecordStream(), MemoryWeightChannel()
    trainer = OnlineTrainer(cfg, target, stream, weights)
    head = new_head(target, 96)
    for r in _records(target, head, 16):
        stream.append(r.to_bytes())
    stream.append(b"not a record")  # skipped and counted, never fatal
    while trainer.ingest(block_ms=10):
        pass
    assert trainer.records_in == 16 and trainer.records_bad == 1 and 2 <= len(trainer.holdout) <= 8
    assert len(stream.acked) == 17
    assert trainer.should_train()
    for _ in range(40):
        trainer.train_once()
    assert trainer.last_gate is not None
    assert trainer.version >= 1 and weights.latest_version() == trainer.version
    data, meta = weights.fetch(trainer.version)
    assert meta["version"] == trainer.version and "published_at" in meta
    assert set(state_from_bytes(data)) == set(head.state_dict())
    assert trainer.last_gate["candidate"] > trainer.last_gate["serving"] or not trainer.last_gate["published"]


def test_disabled_trainer_never_trains():
    target = tiny_target()
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.online.enabled = False
    stream = MemoryRecordStream()
    trainer = OnlineTrainer(cfg, target, stream, MemoryWeightChannel())
    for r in _records(target, new_head(target, 96), 12):
        stream.append(r.to_bytes())
    trainer.ingest(block_ms=10)
    assert not trainer.should_train()


def test_batches_mix_the_newest_records_with_replay():
    target = tiny_target()
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.online.recent_records = 4
    trainer = OnlineTrainer(cfg, target, MemoryRecordStream(), MemoryWeightChannel())
    records = _records(target, new_head(target, 96), 40)
    trainer.buffer.extend(records)
    newest = {r.request_id for r in records[-4:]}
    for _ in range(20):
        batch = trainer.sample_batch(6)
        ids = [r.request_id for r in batch]
        assert len(set(ids)) == 6
        assert sum(i in newest for i in ids) >= 3  # half the batch is current traffic


def test_after_drift_the_gate_judges_on_the_new_traffic_only():
    target = tiny_target()
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.online.holdout_every, cfg.online.drift_lookback = 2, 1  # drift fires on the first new record
    stream = MemoryRecordStream()
    trainer = OnlineTrainer(cfg, target, stream, MemoryWeightChannel())
    for r in _records(target, new_head(target, 96), 24, seed=0):
        stream.append(replace(r, accept_len=3.0).to_bytes())
    while trainer.ingest(block_ms=10):
        pass
    old_ids = {r.request_id for r in trainer.gate_records()}
    assert len(old_ids) >= 2 and trainer.drift_events == 0
    for i, r in enumerate(_records(target, new_head(target, 96), 8, seed=1)):
        stream.append(replace(r, request_id=f"new-{i}", accept_len=1.0).to_bytes())
    while trainer.ingest(block_ms=10):
        pass
    assert trainer.drift_events == 1
    gate_ids = {r.request_id for r in trainer.gate_records()}
    assert len(gate_ids) >= 2 and all(i.startswith("new-") for i in gate_ids)
    assert any(i in old_ids for _, r in trainer.holdout for i in [r.request_id])  # kept, not judged on
    assert trainer.should_train()


def test_publishes_above_a_version_someone_else_published():
    target = tiny_target()
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    weights = MemoryWeightChannel()
    trainer = OnlineTrainer(cfg, target, MemoryRecordStream(), weights)
    assert trainer.version == 0
    weights.publish(50, b"an operator's draft", {})
    trainer.publish()
    assert trainer.version == weights.latest_version() == 51
    assert state_from_bytes(weights.fetch(51)[0]).keys() == trainer.head.state_dict().keys()


def test_starts_on_a_bf16_target_whose_linears_take_tide_kernels():
    """The default config on an AVX2 CPU: a bf16 target on tide.kernels. The trainer deep-copies
    its head for the eval gate; that once raised `cannot pickle 'module' object`."""
    import pytest

    from tide import kernels
    from tide.models import use_skinny_matmul

    if not kernels.can_run():
        pytest.skip("tide.kernels needs an x86 CPU with AVX2")
    target = tiny_target()
    target.model.to(torch.bfloat16)
    use_skinny_matmul(target.model, "always")
    target.skinny_matmul, target.bf16_kernel = True, "always"
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    trainer = OnlineTrainer(cfg, target, MemoryRecordStream(), MemoryWeightChannel())
    assert trainer.serving_head is not trainer.head and trainer.version == 0


def test_trains_on_idle_compute_and_yields_while_replicas_serve():
    """busy_share=0: no step while a replica is marked busy, full speed once it is idle; a mark
    that is not refreshed expires (a dead replica is not busy). busy_share=0.5 and replicas
    earning 1.8x: after each step taken while serving, a pause as long as the step."""
    import threading
    import time

    from tide.transport.memory import MemoryLoadBoard

    target = tiny_target(init=0.3)
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.train.batch_size, cfg.train.ttt_steps = 4, 2
    cfg.online.min_records, cfg.online.goal_accept_len, cfg.online.busy_share = 4, 100.0, 0.0
    stream, board = MemoryRecordStream(), MemoryLoadBoard()
    for r in _records(target, new_head(target, 96), 12):
        stream.append(r.to_bytes())
    trainer = OnlineTrainer(cfg, target, stream, MemoryWeightChannel(), load=board)
    board.mark("r0", True, ttl_s=60)
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        assert trainer.should_train() and trainer.steps == 0 and trainer.yielded_s > 0
        board.mark("r0", True, ttl_s=0.2)  # the replica stops refreshing its mark
        deadline = time.time() + 20
        while trainer.steps < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert trainer.steps >= 3 and trainer.train_s["idle"] > 0 and trainer.train_s["busy"] == 0
    finally:
        stop.set()
        thread.join(10)
    cfg.online.busy_share = 0.5
    board.mark("r0", True, ttl_s=60, gain=1.8)
    before = trainer.yielded_s
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(1.5)
    stop.set()
    thread.join(10)
    assert trainer.train_s["busy"] > 0
    assert trainer.yielded_s - before >= 0.8 * trainer.train_s["busy"]  # half the time, at most


def test_while_serving_the_trainer_takes_the_share_that_speculation_earns():
    """gain - 1 of the busy time (the lowest gain among busy replicas), between busy_share_min
    and busy_share; the least where no replica reports a gain or none is busy with one."""
    from tide.transport.memory import MemoryLoadBoard

    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.online.busy_share, cfg.online.busy_share_min = 0.2, 0.03
    board = MemoryLoadBoard()
    trainer = OnlineTrainer(cfg, tiny_target(), MemoryRecordStream(), MemoryWeightChannel(), load=board)
    board.mark("r0", True, ttl_s=60)
    assert trainer.busy_share() == 0.03  # no gain reported: serving first
    board.mark("r0", True, ttl_s=60, gain=1.1)
    assert trainer.busy_share() == pytest.approx(0.1)
    board.mark("r1", True, ttl_s=60, gain=0.9)  # a replica that drafting costs: the least
    assert trainer.busy_share() == 0.03
    board.mark("r1", False, ttl_s=0)
    board.mark("r0", True, ttl_s=60, gain=2.5)
    assert trainer.busy_share() == 0.2 and trainer.stats()["busy_share"] == 0.2


def test_malformed_records_are_skipped_and_counted_never_fatal():
    target = tiny_target()
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    stream = MemoryRecordStream()
    trainer = OnlineTrainer(cfg, target, stream, MemoryWeightChannel())
    good = _records(target, new_head(target, 96), 1)[0]

    def variant(**kw):
        return HiddenStateRecord(**{**{f: getattr(good, f) for f in (
            "request_id", "target_model_id", "draft_version", "input_ids", "features", "final_hidden",
            "prompt_len", "accept_len")}, **kw}).to_bytes()

    T, H = good.num_positions, good.final_hidden.shape[1]
    nan = good.features.clone()
    nan[0, 0] = float("nan")
    bad = [b"", b"\x00" * 7, b"garbage" * 100, good.to_bytes()[:-10],  # not a record at all
           variant(target_model_id="another-model"),
           variant(features=torch.randn(T, 2 * H)),  # another target's widths
           variant(features=nan),
           variant(input_ids=good.input_ids + 10_000),  # outside the vocabulary
           variant(prompt_len=T + 5), variant(accept_len=float("inf"))]
    for data in bad:
        stream.append(data)
    stream.append(good.to_bytes())
    while trainer.ingest(block_ms=10):
        pass
    assert trainer.records_bad == len(bad) and trainer.records_in == 1
    assert len(stream.acked) == len(bad) + 1  # skipped entries are acknowledged, not re-read


def test_replay_buffer_is_bounded_in_bytes():
    target = tiny_target()
    cfg = TideConfig()
    cfg.draft.vocab_size = 96
    cfg.online.buffer_mb, cfg.online.buffer_records, cfg.online.holdout_every = 1, 10_000, 10_000
    trainer = OnlineTrainer(cfg, target, MemoryRecordStream(), MemoryWeightChannel())
    rec = _records(target, new_head(target, 96), 1)[0]
    size = sum(t.numel() * t.element_size() for t in (rec.input_ids, rec.features, rec.final_hidden))
    for _ in range(3 * (1 << 20) // size):
        trainer._buffer(rec)
    assert trainer.buffer_bytes <= 1 << 20 and trainer.buffer_bytes == size * len(trainer.buffer)
    assert len(trainer.buffer) == (1 << 20) // size


def test_the_trainer_runs_below_serving_s_os_priority():
    """online.niceness: the trainer's process is made at least that nice, never less nice
    (in a child process: niceness cannot be taken back)."""
    import subprocess
    import sys

    code = ("import os; from trainers.actor import lower_priority; "
            "print(lower_priority(7), lower_priority(3), os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base = os.nice(0)
    assert out == [str(max(7, base))] * 3
