"""Offline warm start: the target answers a prompt set (trainers.target_data captures its hidden
states as `HiddenStateRecord`s), and a fresh draft head trains on them with the shared
`train_step`."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from tide.checkpoint import new_head, save_draft
from tide.config import ConfigError, TideConfig, to_dict
from tide.models import Target, load_target, resolve_dtype
from tide.prompts import HOLDOUT_EVERY, Prompt
from tide.records import HiddenStateRecord, load_records, save_records
from trainers.target_data import generate_records, synthesize_prompts
from trainers.train_step import evaluate, make_batches, make_optimizer, train_step

log = logging.getLogger(__name__)

SYNTH_TAG = "warm-synth"  # request ids of answers to prompts the target wrote itself


def token_counts(records: list[HiddenStateRecord], vocab_size: int) -> torch.Tensor:
    """How often each target token is generated: the draft vocabulary keeps the most frequent."""
    gen = [r.input_ids[r.prompt_len :] for r in records]
    return torch.bincount(torch.cat(gen), minlength=vocab_size)[:vocab_size]


def train_head(head, target: Target, train: list, holdout: list, cfg: TideConfig, on_metrics=None,
               on_epoch=None):
    """Epochs of the shared train_step over records; returns the held-out metrics per epoch.
    on_epoch(head, history) runs after each epoch (the warm start saves a checkpoint there)."""
    tc = cfg.train
    device = target.model.device  # where the target is, the head trains (train.device)
    head.float().to(device)
    rows = target.lm_head_weight[head.target_ids].float()
    embed = target.embed
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the head's products; the target is done
    bf16 = resolve_dtype(tc.precision, device) == "bfloat16"
    log.info("training in %s", "bf16 autocast" if bf16 else "fp32")
    opt = make_optimizer(head, tc.lr, tc.weight_decay)
    rng = random.Random(tc.seed)
    history = [{"epoch": 0, **evaluate(head, embed, rows, holdout, tc.ttt_steps, tc.seq_len, tc.batch_size)}]
    log.info("before training: held-out simulated acceptance length %.2f",
             history[0]["sim_accept_len"])
    n_batches = sum(1 for _ in make_batches(train, tc.seq_len, tc.batch_size))
    sched = warmup_cosine(opt, tc.epochs * n_batches, tc.warmup_frac, tc.min_lr_frac)
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        for i, batch in enumerate(make_batches(train, tc.seq_len, tc.batch_size, rng), 1):
            m = train_step(head, embed, rows, batch.to(device), opt, tc.ttt_steps, tc.grad_clip, bf16)
            sched.step()
            if on_metrics:
                on_metrics(m)
            if i % 10 == 0 or i == n_batches:
                log.info("epoch %d batch %d/%d loss %.3f acc %s sim-accept %.2f", epoch, i,
                         n_batches, m["loss"], [round(a, 2) for a in m["acc"]], m["sim_accept_len"])
        ev = evaluate(head, embed, rows, holdout, tc.ttt_steps, tc.seq_len, tc.batch_size)
        history.append({"epoch": epoch, **ev})
        log.info("epoch %d done in %.0f s: held-out loss %.3f acc %s simulated acceptance length %.2f",
                 epoch, time.perf_counter() - t0, ev["loss"], [round(a, 3) for a in ev["acc"]],
                 ev["sim_accept_len"])
        if on_epoch:
            on_epoch(head, history)
    return history


def train_device(name: str) -> torch.device:
    """The device of train.device, checked: a missing GPU is a clear error, not a crash later."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use train.device=cpu")
    return device


def warmup_cosine(opt, total_steps: int, warmup_frac: float, min_lr_frac: float):
    """Linear warmup, then cosine decay to min_lr_frac of the peak learning rate."""
    warmup = max(1, int(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def warm_start(cfg: TideConfig, prompts: list[Prompt], out_dir: str | Path,
               records_dir: str | Path | None = None) -> dict:
    """Train a head; records are read from `records_dir` when it holds some, else generated
    (and saved there when given, so a later run with other training settings can reuse them)."""
    tc = cfg.train
    device = train_device(tc.device)
    target = load_target(replace(cfg.model, dtype=resolve_dtype(tc.gen_dtype, device)), cfg.draft.feature_layers)
    target.model.to(device)
    t0 = time.perf_counter()
    if records_dir and any(Path(records_dir).glob("*.rec")):
        records = load_records(records_dir)
        log.info("loaded %d records from %s", len(records), records_dir)
    else:
        # the first answer to each prompt greedy; the others (all in one go: batches hold
        # answers to the same prompt, prefilled once) from a sampled prefix, then greedy
        log.info("%d greedy answers", len(prompts))
        records = generate_records(target, prompts, tc.gen_max_new_tokens, tc.gen_batch_size, seed=0)
        if tc.gen_samples > 1:
            log.info("%d answers with a sampled prefix", len(prompts) * (tc.gen_samples - 1))
            records += generate_records(target, prompts * (tc.gen_samples - 1), tc.gen_max_new_tokens,
                                        tc.gen_batch_size, tc.gen_temperature, tc.gen_sampled_prefix,
                                        seed=1, tag="warm-sampled")
        if tc.gen_synth_prompts > 0:
            synth = synthesize_prompts(target, tc.gen_synth_prompts, tc.gen_batch_size, seed=2)
            log.info("%d greedy answers to synthesized prompts", len(synth))
            records += generate_records(target, synth, tc.gen_max_new_tokens, tc.gen_batch_size, seed=3,
                                        tag=SYNTH_TAG)
        if records_dir:
            save_records(records, Path(records_dir))
    gen_s = time.perf_counter() - t0
    counts = token_counts(records, target.config.vocab_size)
    head = new_head(target, cfg.draft.vocab_size, counts, seed=cfg.draft.seed)
    # hold out whole prompts (all their answers), never a sibling of a training answer
    # (answers to synthesized prompts only train: the held-out score stays on the given prompts)
    n_prompts = max(len(prompts), 1) if prompts else len(records)
    held = lambda i: (i % n_prompts) % HOLDOUT_EVERY == 0 and not records[i].request_id.startswith(SYNTH_TAG)
    holdout, train = [r for i, r in enumerate(records) if held(i)], [r for i, r in enumerate(records) if not held(i)]
    t0 = time.perf_counter()
    coverage = float(counts[head.target_ids].sum() / counts.sum().clamp_min(1))

    saved: list[dict] = []

    def save(head, history) -> None:  # after every epoch: a long run leaves a usable head early
        summary = {
            "prompts": len(prompts), "records": len(records),
            "synth_records": sum(r.request_id.startswith(SYNTH_TAG) for r in records),
            "generated_tokens": int(sum(r.num_positions + 1 - r.prompt_len for r in records)),
            "generate_s": round(gen_s, 1), "train_s": round(time.perf_counter() - t0, 1),
            "device": str(device), "history": history, "config": to_dict(cfg), "vocab_coverage": coverage,
        }
        out = save_draft(head, out_dir, version=1, target=target)
        (out / "train_metrics.json").write_text(json.dumps(summary, indent=2))
        saved.append(summary)

    history = train_head(head, target, train, holdout, cfg, on_epoch=save)
    if not saved:  # no epochs: the untrained head
        save(head, history)
    summary = saved[-1]
    out = Path(out_dir)
    log.info("saved draft head to %s (held-out simulated acceptance length %.2f -> %.2f)", out,
             history[0]["sim_accept_len"], history[-1]["sim_accept_len"])
    return summary
