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

import json
import logging
from array import array
from collections import deque
from pathlib import Path

import torch

from tide.errors import TideError

log = logging.getLogger(__name__)


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


SCORE_REACH = 32  # AnswerHistory.copy: agreement counted back this far to pick among occurrences


class AnswerHistory:
    """Drafts from the answers served before (SuffixDecoding, Oliaro 2024; REST, He 2023), at
    no training cost: the moment an answer is served, its phrasing drafts the next requests.

    Two drafts (the speculative loop asks for the copy before prompt lookup, whose matches are
    shorter, and for the chain where lookup finds nothing):
    - a copy: when the text's last `match_ngram` tokens occurred in an answer, the tokens that
      followed, as many as the match reaches back (m tokens agree: min(m, k)), as prompt lookup
      copies from the prompt. Of the last `max_candidates` occurrences, the one with the longest
      copy wins, then the one whose match reaches furthest back, then the newest: the answer to
      the same request over a newer one that shares a phrase. One occurrence is enough: a request
      served before (a retry, a popular prompt, an agent's repeated step) is drafted whole,
      whichever replica served it.
    - a chain from counts of the token that followed every context of `min_ngram`..`max_ngram`
      tokens: the longest context of the text's end that the history knows decides the next
      token, the one that followed it most often, as long as it did so at least `min_count`
      times and in at least `min_share` of them; the chain stops at the first context that is
      unknown or undecided. Where a model's answers share their phrasing (`To solve this
      problem, we...`, the code around a function), the chain is often right for several
      tokens; where they do not it stays silent and the head drafts.

    Bounded memory: past `max_tokens` answer tokens, the oldest answers are forgotten (their
    counts and copies taken back). Lossless like any draft: its tokens are verified by the
    target. Not thread-safe; the serving engine adds and drafts under its decode lock."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, max_tokens: int = 200_000,
                 min_count: int = 2, min_share: float = 0.6, match_ngram: int = 12, max_candidates: int = 16):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if match_ngram < 0:
            raise ValueError(f"need match_ngram >= 0 (0 = no copies), got {match_ngram}")
        if max_candidates < 1:
            raise ValueError(f"need max_candidates >= 1, got {max_candidates}")
        self.min_ngram, self.max_ngram, self.max_tokens = min_ngram, max_ngram, max_tokens
        self.min_count, self.min_share, self.match_ngram = min_count, min_share, match_ngram
        self.max_candidates = max_candidates
        self._next: dict[tuple[int, ...], dict[int, int]] = {}
        # The copies' index, hash chains as in zlib: hash of a match_ngram-gram -> where it last
        # ended, packed as serial << 32 | end; each answer's `prev` holds, for every position its
        # n-grams end at, where the same hash ended before (-1: nowhere). A hash collision is
        # caught by comparing the tokens; a chain ends at an answer forgotten since.
        self._last: dict[int, int] = {}
        # (context + answer, where the answer starts, prev: one entry per end max(first, n)..len-1)
        self._answers: deque[tuple[list[int], int, array]] = deque()
        self._first_serial = 0  # serial number of self._answers[0]
        self.tokens = 0  # answer tokens held

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def context_tokens(self) -> int:
        """How many of a prompt's last tokens add() keeps (the rest is never read)."""
        return max(self.max_ngram, self.match_ngram)

    def add(self, context: list[int], answer: list[int]) -> None:
        """Learn an answer; `context`: the tokens before it (the end of its prompt), so that the
        answer's first tokens are learned too."""
        if not answer:
            return
        seq = [*context[-self.context_tokens:], *answer]
        first = len(seq) - len(answer)
        self._count(seq, first, +1)
        prev = self._index(seq, first, self._first_serial + len(self._answers))
        self._answers.append((seq, first, prev))
        self.tokens += len(answer)
        while self.tokens > self.max_tokens and len(self._answers) > 1:
            old, old_first, _ = self._answers.popleft()
            self._count(old, old_first, -1)
            self._unindex(old, old_first, self._first_serial)
            self._first_serial += 1
            self.tokens -= len(old) - old_first

    def rebuilt(self, match_ngram: int) -> AnswerHistory:
        """A history of the same answers that copies on match_ngram tokens (what `tide tune`
        compares). Each answer keeps the prompt tokens it kept here, so one built with the
        largest match_ngram to compare equals a history built afresh with each."""
        out = AnswerHistory(self.max_ngram, self.min_ngram, self.max_tokens, self.min_count, self.min_share,
                            match_ngram, self.max_candidates)
        for seq, first, _ in self._answers:
            out.add(seq[:first], seq[first:])
        return out

    def _index(self, seq: list[int], first: int, serial: int) -> array:
        """Link the answer's n-grams into the chains; returns its prev."""
        n, prev = self.match_ngram, array("q")
        if not n:
            return prev
        last = self._last
        for e in range(max(first, n), len(seq)):  # the n tokens before seq[e] end at e
            key = hash(tuple(seq[e - n : e]))
            prev.append(last.get(key, -1))
            last[key] = serial << 32 | e
        return prev

    def _unindex(self, seq: list[int], first: int, serial: int) -> None:
        """Forget the oldest answer: chains that reach it end there (copy() stops at serials
        before the first one held), heads that still point into it go."""
        n = self.match_ngram
        for e in range(max(first, n), len(seq)) if n else ():
            key = hash(tuple(seq[e - n : e]))
            if self._last.get(key) == serial << 32 | e:  # no newer occurrence since
                del self._last[key]

    def _count(self, seq: list[int], first: int, sign: int) -> None:
        for e in range(first, len(seq)):  # seq[e] follows the contexts ending at e - 1
            for n in range(self.min_ngram, min(self.max_ngram, e) + 1):
                ctx = tuple(seq[e - n : e])
                nxt = self._next.setdefault(ctx, {})
                c = nxt.get(seq[e], 0) + sign
                if c > 0:
                    nxt[seq[e]] = c
                else:
                    nxt.pop(seq[e], None)
                    if not nxt:
                        del self._next[ctx]

    def copy(self, sequence: list[int], k: int) -> list[int] | None:
        """Up to k tokens that followed the text's last match_ngram tokens in an earlier answer,
        or None. sequence: the text, its last token the next token y."""
        n = self.match_ngram
        if not n or len(sequence) < n:
            return None
        suffix = list(sequence[-n:])
        where = self._last.get(hash(tuple(suffix)), -1)
        best, best_score = None, (0, 0)
        reach = max(k, SCORE_REACH)  # how far back agreement is counted, to rank the candidates
        for _ in range(self.max_candidates):
            i = (where >> 32) - self._first_serial
            if where < 0 or i < 0:  # the chain's end, or an answer forgotten since
                break
            seq, first, prev = self._answers[i]
            end = where & 0xFFFFFFFF
            where = prev[end - max(first, n)]
            if seq[end - n : end] != suffix:  # a hash collision
                continue
            m = n  # how many tokens agree, counting back from the text's end
            while m < reach and m < end and m < len(sequence) and seq[end - 1 - m] == sequence[-1 - m]:
                m += 1
            score = (min(m, k, len(seq) - end), m)  # the longest copy, then the longest match
            if score > best_score:  # strictly: on a tie the newer occurrence stays
                best, best_score = seq[end : end + score[0]], score
        return best or None

    def chain(self, sequence: list[int], k: int) -> list[int] | None:
        """The counted chain of up to k tokens that follows the text, or None."""
        out, ctx = [], list(sequence[-self.max_ngram:])
        while len(out) < k:
            for n in range(min(self.max_ngram, len(ctx)), self.min_ngram - 1, -1):
                nxt = self._next.get(tuple(ctx[-n:]))
                if nxt is not None:
                    break
            else:
                break
            token, count = max(nxt.items(), key=lambda kv: kv[1])
            if count < self.min_count or count < self.min_share * sum(nxt.values()):
                break
            out.append(token)
            ctx.append(token)
        return out or None


class HistoryError(TideError, ValueError):
    """A history seed that cannot be read; the message names the folder."""


ANSWER_SCHEMA = 1


def answer_to_bytes(source: str, context: list[int], answer: list[int]) -> bytes:
    """A served answer as the replicas share it (plain JSON, never pickle): who served it (a
    per-process id, so a replica skips its own), the last tokens of its prompt, the answer."""
    return json.dumps({"schema": ANSWER_SCHEMA, "source": source, "context": list(context),
                       "answer": list(answer)}, separators=(",", ":")).encode()


def answer_from_bytes(data: bytes, vocab_size: int, max_tokens: int) -> tuple[str, list[int], list[int]]:
    """(source, context, answer) of a shared answer; HistoryError when it is not one this
    target can draft from (other schema, ids outside its vocabulary, over max_tokens)."""
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise HistoryError(f"shared answer is not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("schema") != ANSWER_SCHEMA:
        got = msg.get("schema") if isinstance(msg, dict) else type(msg).__name__
        raise HistoryError(f"shared answer schema {got!r}, this replica reads {ANSWER_SCHEMA}")
    source, context, answer = msg.get("source"), msg.get("context"), msg.get("answer")
    if not isinstance(source, str):
        raise HistoryError("shared answer without a source")
    for name, ids in (("context", context), ("answer", answer)):
        if not isinstance(ids, list) or len(ids) > max_tokens:
            raise HistoryError(f"shared answer's {name} is not a list of at most {max_tokens} ids")
        if not all(type(t) is int and 0 <= t < vocab_size for t in ids):
            raise HistoryError(f"shared answer's {name} holds ids outside 0..{vocab_size - 1}")
    return source, context, answer


def history_from_config(cfg, skip_prompts: set[tuple[int, ...]] = frozenset()) -> AnswerHistory | None:
    """cfg: TideConfig. The replica's history when decode.history_k > 0, seeded with the answers
    of serving.history_records (a records folder) when set; else None. Records whose prompt
    (token ids) is in skip_prompts are left out: `tide tune` replays those prompts."""
    if not cfg.decode.history_k:
        return None
    s = cfg.serving
    history = AnswerHistory(max_ngram=s.history_ngram, max_tokens=s.history_tokens,
                            match_ngram=s.history_match_ngram)
    if s.history_records:
        from tide.records import RecordError, load_records

        folder = Path(s.history_records).expanduser()
        if not folder.is_dir():
            raise HistoryError(f"serving.history_records: no such folder: {folder}")
        try:
            records = load_records(folder)
        except RecordError as e:
            raise HistoryError(f"serving.history_records: {folder}: {e}") from None
        for r in records:
            ids = r.input_ids.tolist()
            if tuple(ids[: r.prompt_len]) not in skip_prompts:
                history.add(ids[: r.prompt_len], ids[r.prompt_len :])
        log.info("answer history: %d answers (%d tokens) from %s", len(history), history.tokens, folder)
    return history
