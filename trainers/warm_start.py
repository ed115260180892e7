"""Offline warm start: the target answers a prompt set, we capture its hidden states as
`HiddenStateRecord`s, and train a fresh draft head on them with the shared `train_step`."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from tide.checkpoint import new_head, save_draft
from tide.config import TideConfig, to_dict
from tide.models import Target, load_target
from tide.prompts import Prompt, encode
from tide.records import HiddenStateRecord
from trainers.train_step import evaluate, make_batches, make_optimizer, train_step

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate_records(target: Target, prompts: list[Prompt], max_new_tokens: int,
                     batch_size: int, temperature: float = 0.0, seed: int = 0) -> list[HiddenStateRecord]:
    """Answers in batches (greedy, or sampled at `temperature` for more varied data), then one
    teacher-forced pass per batch for the features."""
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(target.eos_ids)
    eos = target.eos_ids
    records = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        encoded = [encode(tok, p) for p in prompts[start : start + batch_size]]
        L = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), L), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, e in enumerate(encoded):  # left padding for generation
            ids[b, L - len(e):], attn[b, L - len(e):] = torch.tensor(e), 1
        out = target.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad, **sampling)
        seqs = []
        for b, e in enumerate(encoded):
            gen = out[b, L:].tolist()
            cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
            seqs.append(e + gen[:cut])
        records += _capture(target, seqs, [len(e) for e in encoded], start)
        log.info("generated %d/%d answers (%.0f s)", min(start + batch_size, len(prompts)),
                 len(prompts), time.perf_counter() - t0)
    return records


def _capture(target: Target, seqs: list[list[int]], prompt_lens: list[int], offset: int):
    """Right-padded teacher-forced pass; causal attention keeps padding out of real positions."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], attn[b, : len(s)] = torch.tensor(s), 1
    hs = target.model(input_ids=ids, attention_mask=attn, output_hidden_states=True,
                      logits_to_keep=1).hidden_states
    feats = torch.cat([hs[i] for i in target.feature_layers], dim=-1)
    out = []
    for b, s in enumerate(seqs):
        n = len(s) - 1  # positions 0..n-1 have features; x_n is the last token
        out.append(HiddenStateRecord(
            request_id=f"warm-{offset + b}", target_model_id=target.model_id, draft_version=0,
            input_ids=torch.tensor(s), features=feats[b, :n].clone(),
            final_hidden=hs[-1][b, :n].clone(), prompt_len=prompt_lens[b]))
    return out


def token_counts(records: list[HiddenStateRecord], vocab_size: int) -> torch.Tensor:
    """How often each target token is generated: the draft vocabulary keeps the most frequent."""
    gen = [r.input_ids[r.prompt_len :] for r in records]
    return torch.bincount(torch.cat(gen), minlength=vocab_size)[:vocab_size]


def train_head(head, target: Target, train: list, holdout: list, cfg: TideConfig, on_metrics=None):
    """Epochs of the shared train_step over records; returns the held-out metrics per epoch."""
    tc = cfg.train
    head.float()
    rows = target.lm_head_weight[head.target_ids].float()
    embed = target.embed
    opt = make_optimizer(head, tc.lr, tc.weight_decay)
    rng = random.Random(tc.seed)
    history = [{"epoch": 0, **evaluate(head, embed, rows, holdout, tc.ttt_steps, tc.seq_len)}]
    log.info("before training: held-out simulated acceptance length %.2f",
             history[0]["sim_accept_len"])
    n_batches = sum(1 for _ in make_batches(train, tc.seq_len, tc.batch_size))
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        for i, batch in enumerate(make_batches(train, tc.seq_len, tc.batch_size, rng), 1):
            m = train_step(head, embed, rows, batch, opt, tc.ttt_steps, tc.grad_clip)
            if on_metrics:
                on_metrics(m)
            if i % 10 == 0 or i == n_batches:
                log.info("epoch %d batch %d/%d loss %.3f acc %s sim-accept %.2f", epoch, i,
                         n_batches, m["loss"], [round(a, 2) for a in m["acc"]], m["sim_accept_len"])
        ev = evaluate(head, embed, rows, holdout, tc.ttt_steps, tc.seq_len)
        history.append({"epoch": epoch, **ev})
        log.info("epoch %d done in %.0f s: held-out loss %.3f acc %s simulated acceptance length %.2f",
                 epoch, time.perf_counter() - t0, ev["loss"], [round(a, 3) for a in ev["acc"]],
                 ev["sim_accept_len"])
    return history


def save_records(records: list[HiddenStateRecord], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        (folder / f"{i:05d}.rec").write_bytes(r.to_bytes())


def load_records(folder: str | Path) -> list[HiddenStateRecord]:
    return [HiddenStateRecord.from_bytes(p.read_bytes()) for p in sorted(Path(folder).glob("*.rec"))]


def warm_start(cfg: TideConfig, prompts: list[Prompt], out_dir: str | Path,
               records_dir: str | Path | None = None) -> dict:
    """Train a head; records are read from `records_dir` when it holds some, else generated
    (and saved there when given, so a later run with other training settings can reuse them)."""
    target = load_target(cfg.model, cfg.draft.feature_layers)
    t0 = time.perf_counter()
    if records_dir and any(Path(records_dir).glob("*.rec")):
        records = load_records(records_dir)
        log.info("loaded %d records from %s", len(records), records_dir)
    else:
        tc = cfg.train
        records = generate_records(target, prompts, tc.gen_max_new_tokens, tc.gen_batch_size)
        for i in range(1, tc.gen_samples):  # extra sampled answers: more of the target's behaviour
            records += generate_records(target, prompts, tc.gen_max_new_tokens, tc.gen_batch_size,
                                        tc.gen_temperature, seed=i)
        if records_dir:
            save_records(records, Path(records_dir))
    gen_s = time.perf_counter() - t0
    counts = token_counts(records, target.config.vocab_size)
    head = new_head(target, cfg.draft.vocab_size, counts, seed=cfg.draft.seed)
    # hold out whole prompts (all their answers), never a sibling of a training answer
    n_prompts = max(len(prompts), 1) if prompts else len(records)
    held = lambda i: (i % n_prompts) % 10 == 0
    holdout, train = [r for i, r in enumerate(records) if held(i)], [r for i, r in enumerate(records) if not held(i)]
    t0 = time.perf_counter()
    history = train_head(head, target, train, holdout, cfg)
    summary = {
        "prompts": len(prompts), "records": len(records),
        "generated_tokens": int(sum(r.num_positions + 1 - r.prompt_len for r in records)),
        "generate_s": round(gen_s, 1), "train_s": round(time.perf_counter() - t0, 1),
        "history": history, "config": to_dict(cfg),
        "vocab_coverage": float(counts[head.target_ids].sum() / counts.sum().clamp_min(1)),
    }
    out = save_draft(head, out_dir, version=1, target=target)
    (out / "train_metrics.json").write_text(json.dumps(summary, indent=2))
    log.info("saved draft head to %s (held-out simulated acceptance length %.2f -> %.2f)", out,
             history[0]["sim_accept_len"], history[-1]["sim_accept_len"])
    return summary
