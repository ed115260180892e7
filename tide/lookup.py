"""Prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's n-gram proposer):
draft tokens copied from the text so far.

When the last n tokens (the next token y included) occurred earlier in the prompt or the
answer, the tokens that followed that occurrence are a free draft: code repeats identifiers,
arithmetic repeats the question's numbers, an answer quotes its prompt. tide uses it beside the
draft head (`decode.lookup_ngram`): a pass whose suffix matches proposes the copied tokens and
skips the head; any other pass asks the head. The copied tokens go through the same verify and
acceptance rule as the head's (under sampling as a draft distribution with all its mass on the
copied token), so the output stays the target's own.
"""

from __future__ import annotations

import torch


def lookup_draft(sequence: torch.Tensor, max_ngram: int, min_ngram: int, k: int,
                 max_k: int | None = None) -> torch.Tensor | None:
    """sequence: (L,) token ids, the last one the next token y. Returns the tokens that followed an
    earlier occurrence of the longest suffix of `max_ngram` down to `min_ngram` tokens (the most
    recent occurrence with k tokens after it, else the most recent), or None when no such suffix
    occurred before.

    How many: k, or more, up to `max_k`, when the match reaches further back than the n-gram: a
    copy proposes as many tokens as the text before the occurrence agrees with the text before
    the suffix (m tokens agree: min(max(m, k), max_k) tokens). A long shared context predicts a
    long shared continuation; on the target's answers to held-out prompts, matches of 16+ tokens
    ran on for 8+ more tokens two times in three, 2-token matches once in fourteen. A copy that
    reaches the end of the text goes on copying its own tokens (as LZ77 does): the suffix repeats
    with the period it has so far."""
    n_tokens = sequence.shape[0]
    max_k = max(k, max_k or k)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        # windows that start at 0 .. L-n-1: each has at least one token after it, the suffix
        # itself (start L-n) is not among them
        windows = sequence[:-1].unfold(0, n, 1)
        hits = (windows == sequence[-n:]).all(dim=1).nonzero()
        if hits.numel():
            starts = hits[:, 0] + n
            full = starts[starts + k <= n_tokens]
            start = int(full[-1] if full.numel() else starts[-1])
            m = n + _agree_backwards(sequence[: start - n], sequence[: n_tokens - n], max_k - n)
            want, period = min(max(m, k), max_k), n_tokens - start
            reps = -(-want // period)  # the copy, read past the end of the text, repeats itself
            return sequence[start:].repeat(reps)[:want].clone()
    return None


def _agree_backwards(a: torch.Tensor, b: torch.Tensor, limit: int) -> int:
    """How many last tokens of a and b agree (at most limit)."""
    span = min(a.shape[0], b.shape[0], max(limit, 0))
    if span == 0:
        return 0
    same = (a[a.shape[0] - span :] == b[b.shape[0] - span :]).flip(0)
    return int(same.cumprod(0).sum())
