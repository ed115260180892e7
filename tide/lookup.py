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


def lookup_draft(sequence: torch.Tensor, max_ngram: int, min_ngram: int, k: int) -> torch.Tensor | None:
    """sequence: (L,) token ids, the last one the next token y. Returns up to k tokens that followed
    an earlier occurrence of the longest suffix of `max_ngram` down to `min_ngram` tokens (the
    most recent occurrence with k tokens after it, else the most recent), or None when no such
    suffix occurred before."""
    n_tokens = sequence.shape[0]
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        # windows that start at 0 .. L-n-1: each has at least one token after it, the suffix
        # itself (start L-n) is not among them
        windows = sequence[:-1].unfold(0, n, 1)
        hits = (windows == sequence[-n:]).all(dim=1).nonzero()
        if hits.numel():
            starts = hits[:, 0] + n
            full = starts[starts + k <= n_tokens]
            start = int(full[-1] if full.numel() else starts[-1])
            return sequence[start : start + k].clone()
    return None
