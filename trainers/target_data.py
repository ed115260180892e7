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
from tide.prompts import Prompt, encode
from tide.records import HiddenStateRecord

log = logging.getLogger(__name__)

RECORD_DTYPE = torch.bfloat16  # what serving captures; half the bytes of fp32


@torch.inference_mode()
def generate_records(target: Target, prompts: list[Prompt], max_new_tokens: int, batch_size: int,
                     temperature: float = 0.0, sampled_prefix: int | None = None, seed: int = 0,
                     tag: str = "warm") -> list[HiddenStateRecord]:
    """One record per prompt. temperature 0: greedy. Otherwise each answer samples its first m
    tokens at `temperature`, m uniform in [0, sampled_prefix] (None: every token), then greedy."""
    gen = torch.Generator().manual_seed(seed)
    encoded = [encode(target.tokenizer, p) for p in prompts]
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
        for i, rec in zip(idx, _decode_batch(target, batch, max_new_tokens, temperature, prefix, gen)):
            records[i] = HiddenStateRecord(
                request_id=f"{tag}-{seed}-{i}", target_model_id=target.model_id, draft_version=0,
                input_ids=torch.tensor(rec[0]), features=rec[1], final_hidden=rec[2],
                prompt_len=len(encoded[i]))
            tokens += len(rec[0]) - len(encoded[i])
        log.info("target answers %d/%d (%d tokens, %.0f tok/s)", min(start + batch_size, len(order)),
                 len(order), tokens, tokens / (time.perf_counter() - t0))
    return records


def _decode_batch(target: Target, batch: list[list[int]], max_new: int, temperature: float,
                  prefix: torch.Tensor, gen: torch.Generator):
    """Left-padded batched decoding; a finished answer leaves the batch (and its KV cache) at
    once, so no step is spent on it. Returns, per prompt, (ids, features (n, 3H),
    final_hidden (n, H)) with n = len(ids) - 1 (the last token is never fed)."""
    B, L = len(batch), max(len(e) for e in batch)
    cache, first = _prefill_left_padded(target, batch, L)
    attn = torch.zeros(B, L, dtype=torch.long)
    for b, e in enumerate(batch):
        attn[b, L - len(e) :] = 1
    pos = attn.sum(-1, keepdim=True) - 1  # (B, 1): the last prompt position
    eos = torch.tensor(sorted(target.eos_ids))
    alive = torch.arange(B)  # rows still decoding, as indices into `batch`
    feats = [[] for _ in range(B)]
    finals = [[] for _ in range(B)]
    answers = [[] for _ in range(B)]
    f, h, logits = first
    for step in range(max_new):
        nxt = logits.argmax(-1)
        rows = (step < prefix[alive]).nonzero()[:, 0] if temperature > 0 else ()
        if len(rows):  # only answers still in their sampled prefix pay for sampling
            p = torch.softmax(logits[rows] / temperature, -1)
            nxt[rows] = torch.multinomial(p, 1, generator=gen)[:, 0]
        for j, b in enumerate(alive.tolist()):
            feats[b].append(f[j])
            finals[b].append(h[j])
            answers[b].append(int(nxt[j]))
        keep = ~torch.isin(nxt, eos)
        if step == max_new - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            cache.batch_select_indices(keep.nonzero()[:, 0])
            alive, nxt, attn, pos = alive[keep], nxt[keep], attn[keep], pos[keep]
        attn = torch.cat((attn, torch.ones(len(alive), 1, dtype=torch.long)), dim=1)
        pos = pos + 1
        out = target.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                           use_cache=True, output_hidden_states=True, logits_to_keep=1)
        hs = out.hidden_states
        f = torch.cat([hs[i] for i in target.feature_layers], dim=-1).to(RECORD_DTYPE)  # (b, 1, 3H)
        h = hs[-1].to(RECORD_DTYPE)  # (b, 1, H)
        logits = out.logits[:, -1].float()  # (b, V)
    out = []
    for b, e in enumerate(batch):
        # the final answer token was never fed: features cover every position but the last
        out.append((e + answers[b], torch.cat(feats[b]), torch.cat(finals[b])))
    return out


def _prefill_left_padded(target: Target, batch: list[list[int]], L: int):
    """Prefill each prompt alone (padding a batch to its longest prompt tripled the work on
    mt_bench) and stack the KV caches left-padded to L. Returns the cache and, per prompt, the
    prompt's features, final hidden states and last logits."""
    feats, finals, logits, kv = [], [], [], []
    for e in batch:
        c = DynamicCache(config=target.config)
        out = target.model(input_ids=torch.tensor([e]), past_key_values=c, use_cache=True,
                           output_hidden_states=True, logits_to_keep=1)
        hs = out.hidden_states
        feats.append(torch.cat([hs[i][0] for i in target.feature_layers], dim=-1).to(RECORD_DTYPE))
        finals.append(hs[-1][0].to(RECORD_DTYPE))
        logits.append(out.logits[0, -1].float())
        kv.append([(layer.keys, layer.values) for layer in c.layers])
    cache = DynamicCache(config=target.config)
    for i in range(len(kv[0])):
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, L - t.shape[2], 0))  # (1, h, S, d) -> (1, h, L, d)
        cache.update(torch.cat([pad(x[i][0]) for x in kv]), torch.cat([pad(x[i][1]) for x in kv]), i)
    return cache, (feats, finals, torch.stack(logits))
