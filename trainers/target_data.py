"""The target writes its own training data: batched decoding that captures, at every position,
the features the draft reads and the final hidden state (whose LM head output is the target's
next-token distribution, the training label).

One pass does both: a decode step's hidden states are the features of the token it consumes,
so no second, teacher-forced pass is needed. Answers are greedy, sampled, or sampled for a
random prefix and greedy after it: greedy text is what the draft must predict when serving at
temperature 0, and a sampled prefix sends the greedy continuation down a different path, so
one prompt yields many distinct greedy answers.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import DynamicCache

from tide.models import Target
from tide.prompts import Prompt, encode, user_turn_prefix
from tide.records import HiddenStateRecord
from tide.rejection import greedy_ids

log = logging.getLogger(__name__)

RECORD_DTYPE = torch.bfloat16  # what serving captures; half the bytes of fp32


@torch.inference_mode()
def generate_records(target: Target, prompts: list[Prompt | list[int]], max_new_tokens: int, batch_size: int,
                     temperature: float = 0.0, sampled_prefix: int | None = None, seed: int = 0,
                     tag: str = "warm") -> list[HiddenStateRecord]:
    """One record per prompt (a prompt listed n times gets n answers). temperature 0: greedy.
    Otherwise each answer samples its first m tokens at `temperature`, m uniform in
    [0, sampled_prefix] (None: every token), then greedy. Runs on the target's device; the
    records are on the CPU. A prompt may be given as token ids, already encoded."""
    gen = torch.Generator().manual_seed(seed)
    device = target.model.device
    # sampling happens on the target's device and needs a generator there
    sample_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    encoded = [list(p) if isinstance(p, list) else encode(target.tokenizer, p) for p in prompts]
    # similar lengths share a batch: less padding; records keep their prompt's index
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    records: list[HiddenStateRecord | None] = [None] * len(encoded)
    t0, tokens = time.perf_counter(), 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [encoded[i] for i in idx]
        if sampled_prefix is None:
            prefix = torch.full((len(batch),), max_new_tokens if temperature > 0 else 0)
        else:
            prefix = torch.randint(0, sampled_prefix + 1, (len(batch),), generator=gen)
        answers = _decode_batch(target, batch, max_new_tokens, temperature, prefix, sample_gen)
        for i, rec in zip(idx, answers):
            records[i] = HiddenStateRecord(
                request_id=f"{tag}-{seed}-{i}", target_model_id=target.model_id, draft_version=0,
                input_ids=torch.tensor(rec[0]), features=rec[1], final_hidden=rec[2],
                prompt_len=len(encoded[i]))
            tokens += len(rec[0]) - len(encoded[i])
        log.info("target answers %d/%d (%d tokens, %.0f tok/s)", min(start + batch_size, len(order)),
                 len(order), tokens, tokens / (time.perf_counter() - t0))
    return records


SYNTH_TEMPERATURE = 1.0  # Magpie samples the user turn at 1.0: diverse, still on-topic for the model
SYNTH_MAX_TOKENS = 96


@torch.inference_mode()
def synthesize_prompts(target: Target, n: int, batch_size: int, seed: int = 0) -> list[Prompt]:
    """Up to n distinct user prompts written by the target itself (Magpie, arXiv:2406.08464):
    the chat template up to the start of a user turn is the whole input, and what the model
    samples until its end-of-turn token is a request of the kind it was tuned to answer. More
    distinct prompts is what the warm start lacks (a workload file holds a few hundred)."""
    prefix = user_turn_prefix(target.tokenizer)
    records = generate_records(target, [prefix] * n, SYNTH_MAX_TOKENS, batch_size,
                               temperature=SYNTH_TEMPERATURE, seed=seed, tag="synth")
    seen, prompts = set(), []
    for r in records:
        ids = r.input_ids[r.prompt_len :].tolist()
        if not ids or ids[-1] not in target.eos_ids:
            continue  # ran out of tokens mid-request: not a whole prompt
        text = target.tokenizer.decode(ids[:-1], skip_special_tokens=True).strip()
        if len(text) >= 8 and text not in seen:
            seen.add(text)
            prompts.append(Prompt(text, chat=True))
    log.info("synthesized %d distinct prompts from %d samples", len(prompts), n)
    return prompts


def _decode_batch(target: Target, batch: list[list[int]], max_new: int, temperature: float,
                  prefix: torch.Tensor, gen: torch.Generator):
    """Left-padded batched decoding; a finished answer leaves the batch (and its KV cache) at
    once, so no step is spent on it. Each step's outputs land in preallocated tensors on the
    target's device (no per-row work; the host only syncs for the stop and shrink tests). Returns,
    per prompt, (ids, features (n, 3H), final_hidden (n, H)) on the CPU, n = len(ids) - 1 (the
    last token is never fed)."""
    dev = target.model.device
    B, L = len(batch), max(len(e) for e in batch)
    cache, (prompt_feats, prompt_finals, logits) = _prefill_left_padded(target, batch, L)
    attn = torch.zeros(B, L, dtype=torch.long, device=dev)
    for b, e in enumerate(batch):
        attn[b, L - len(e) :] = 1
    pos = attn.sum(-1, keepdim=True) - 1  # (B, 1): the last prompt position
    eos = torch.tensor(sorted(target.eos_ids), device=dev)
    prefix = prefix.to(dev)
    alive = torch.arange(B, device=dev)  # rows still decoding, as indices into `batch`
    answers = torch.zeros(B, max_new, dtype=torch.long, device=dev)
    n_answer = torch.zeros(B, dtype=torch.long, device=dev)
    # features / final hidden of answer token s, written when step s feeds it to the target
    feats = torch.zeros(B, max_new, prompt_feats[0].shape[-1], dtype=RECORD_DTYPE, device=dev)
    finals = torch.zeros(B, max_new, prompt_finals[0].shape[-1], dtype=RECORD_DTYPE, device=dev)
    for step in range(max_new):
        nxt = greedy_ids(logits)
        if temperature > 0:  # only answers still in their sampled prefix pay for sampling
            rows = (step < prefix[alive]).nonzero()[:, 0]
            if len(rows):
                p = torch.softmax(logits[rows] / temperature, -1)
                nxt[rows] = torch.multinomial(p, 1, generator=gen)[:, 0]
        answers[alive, step] = nxt
        n_answer[alive] += 1
        keep = ~torch.isin(nxt, eos)
        if step == max_new - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            cache.batch_select_indices(keep.nonzero()[:, 0])
            alive, nxt, attn, pos = alive[keep], nxt[keep], attn[keep], pos[keep]
        attn = torch.cat((attn, torch.ones(len(alive), 1, dtype=torch.long, device=dev)), dim=1)
        pos = pos + 1
        out = target.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                           use_cache=True, output_hidden_states=True, logits_to_keep=1)
        hs = out.hidden_states
        feats[alive, step] = torch.cat([hs[i][:, 0] for i in target.feature_layers], dim=-1).to(RECORD_DTYPE)
        finals[alive, step] = hs[-1][:, 0].to(RECORD_DTYPE)
        logits = out.logits[:, -1].float()  # (b, V)
    answers, n_answer, feats, finals = answers.cpu(), n_answer.tolist(), feats.cpu(), finals.cpu()
    out = []
    for b, e in enumerate(batch):
        n = n_answer[b]  # the final answer token was never fed: no features for it
        out.append((e + answers[b, :n].tolist(), torch.cat((prompt_feats[b].cpu(), feats[b, : n - 1])),
                    torch.cat((prompt_finals[b].cpu(), finals[b, : n - 1]))))
    return out


def _prefill_left_padded(target: Target, batch: list[list[int]], L: int):
    """Prefill each distinct prompt once, distinct prompts of equal length together (no padding:
    padding a batch to its longest prompt tripled the work on mt_bench; one call per prompt made
    thousands of short synthesized prompts prefill-bound), and stack the KV caches left-padded to
    L. Returns the cache and, per prompt, the prompt's features, final hidden states and last
    logits."""
    dev = target.model.device
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for e in dict.fromkeys(tuple(e) for e in batch):
        by_len.setdefault(len(e), []).append(e)
    done: dict[tuple[int, ...], tuple] = {}
    for group in by_len.values():
        c = DynamicCache(config=target.config)
        out = target.model(input_ids=torch.tensor(group, device=dev), past_key_values=c, use_cache=True,
                           output_hidden_states=True, logits_to_keep=1)
        hs = out.hidden_states
        feats = torch.cat([hs[i] for i in target.feature_layers], dim=-1).to(RECORD_DTYPE)
        for j, e in enumerate(group):
            done[e] = (feats[j], hs[-1][j].to(RECORD_DTYPE), out.logits[j, -1].float(),
                       [(layer.keys[j : j + 1], layer.values[j : j + 1]) for layer in c.layers])
    rows = [done[tuple(e)] for e in batch]
    cache = DynamicCache(config=target.config)
    for i in range(len(rows[0][3])):
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, L - t.shape[2], 0))  # (1, h, S, d) -> (1, h, L, d)
        cache.update(torch.cat([pad(r[3][i][0]) for r in rows]), torch.cat([pad(r[3][i][1]) for r in rows]), i)
    return cache, ([r[0] for r in rows], [r[1] for r in rows], torch.stack([r[2] for r in rows]))
