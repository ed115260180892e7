"""The speculative loop, in call order: prefill -> propose -> verify -> accept -> commit.

One request, one stream (B = 1). Positions: the target cache holds L tokens x_0..x_{L-1}; the
next token y = x_L is known but not yet fed. Draft entry p reads (target features f_p,
embed(x_{p+1})) and predicts x_{p+2}, so after prefill or a verify pass the newly verified
positions become "pending" draft entries, and the draft's last output proposes d_1.

    verify input      [y, d_1, ..., d_k]      positions L .. L+k
    target output     p_0 .. p_k              p_i judges d_{i+1}; p_k gives the bonus token
    after accepting a tokens and one recovered/bonus token z:
        target cache  -> L + a + 1 tokens      draft cache -> L entries (drop the draft chain)
        pending       <- features rows 0..a with next tokens [d_1..d_a, z]

Acceptance length is counted as in tide.rejection: a + 1 per verify pass.
Greedy decoding with `decode.tree_topk` > 1 proposes a tree instead (tide.tree): the verify input
is [y, tree nodes] under a tree mask, and the rows kept are y and the accepted branch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from tide.config import DecodeConfig
from tide.draft_head import DraftCache, DraftHead
from tide.errors import TideError
from tide.lookup import AnswerHistory, lookup_draft
from tide.models import Target
from tide.policy import HEAD, HISTORY, LOOKUP, NONE, RECALL, TOPS, TREE, FixedPolicy
from tide.rejection import accept_greedy, accept_sampling, greedy_ids, target_probs
from tide.tree import DraftTree, accept_tree_greedy, chain_view, keep_cache_rows, propose_tree, verify_inputs


class ContextTooLong(TideError, ValueError):
    """The prompt leaves no room to generate within the model's context."""


@dataclass
class Generation:
    tokens: list[int]  # generated ids, prompt excluded, truncated at EOS / max_new_tokens
    finish_reason: str  # "stop" (EOS) | "length"
    prompt_len: int
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    passes: int = 0  # verify passes
    # (k,) accepted count at draft position i; a copy's positions past k (decode.lookup_k > k)
    # count in lookup_accepted only
    accepted_per_pos: list[int] = field(default_factory=list)
    lookup_passes: int = 0  # verify passes that checked prompt-lookup tokens instead of the head's
    lookup_accepted: int = 0  # draft tokens of those passes accepted
    history_passes: int = 0  # passes that checked a chain from earlier answers (AnswerHistory)
    history_accepted: int = 0
    plain_passes: int = 0  # passes that checked no draft (the policy judged none worth its cost)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    # training signal, filled when capture=True: every position the target verified
    sequence: list[int] = field(default_factory=list)  # x_0..x_T (T+1 ids)
    features: torch.Tensor | None = None  # (T, 3H)
    final_hidden: torch.Tensor | None = None  # (T, H)

    @property
    def mean_accept_len(self) -> float:
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0

    @property
    def head_accept_len(self) -> float:
        """Acceptance length of the passes the draft head drafted (prompt lookup's and the
        history's and those without a draft left out): what the online trainer watches for drift.
        0.0 when the head drafted no pass."""
        passes = self.passes - self.lookup_passes - self.history_passes - self.plain_passes
        accepted = self.accepted - self.lookup_accepted - self.history_accepted
        return (accepted + passes) / passes if passes else 0.0


@dataclass
class TargetOut:
    logits: torch.Tensor  # (T, V)
    features: torch.Tensor | None  # (T, 3H) low/mid/high hidden states
    final_hidden: torch.Tensor | None  # (T, H) final-norm output, lm_head(final) == logits


def target_forward(target: Target, input_ids: torch.Tensor, cache, hidden: bool = True,
                   last_logits_only: bool = False, position_ids=None, attention_mask=None) -> TargetOut:
    out = target.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                       output_hidden_states=hidden, logits_to_keep=1 if last_logits_only else 0,
                       position_ids=position_ids, attention_mask=attention_mask)
    if not hidden:
        return TargetOut(out.logits[0], None, None)
    hs = out.hidden_states
    features = torch.cat([hs[i][0] for i in target.feature_layers], dim=-1)
    return TargetOut(out.logits[0], features, hs[-1][0])


def sample_token(logits: torch.Tensor, params: DecodeConfig, gen: torch.Generator | None) -> int:
    """logits: (V,). Greedy at temperature 0."""
    if params.temperature == 0:
        return int(greedy_ids(logits))
    p = target_probs(logits[None], params.temperature, params.top_p, params.top_k)[0]
    return int(torch.multinomial(p, 1, generator=gen))


@dataclass
class _State:
    target_cache: DynamicCache
    draft_cache: DraftCache
    length: int  # L: tokens in the target cache
    next_token: int  # y = x_L
    pending_features: torch.Tensor  # (n, 3H)
    pending_tokens: torch.Tensor  # (n,) x_{p+1} for each pending entry
    sequence: list[int]
    captured: list[tuple[torch.Tensor, torch.Tensor]]


def _generator(params: DecodeConfig) -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(params.seed)


def _check_room(target: Target, prompt_len: int, max_context: int) -> None:
    if prompt_len < 1:
        raise ContextTooLong("the prompt is empty")
    if prompt_len >= max_context:
        raise ContextTooLong(
            f"the prompt has {prompt_len} tokens; the context holds {max_context} "
            "(prompt + generated): shorten the prompt")


def prefill(target: Target, prompt_ids: list[int], params: DecodeConfig, gen, hidden=True):
    cache = DynamicCache(config=target.config)
    ids = torch.tensor([prompt_ids])
    out = target_forward(target, ids, cache, hidden=hidden, last_logits_only=True)
    return cache, out, sample_token(out.logits[-1], params, gen)


def feed_pending(head: DraftHead, embed, s: _State) -> torch.Tensor:
    """Run the draft over the verified positions it has not read yet (they pile up while prompt
    lookup drafts); returns its last output (1, 1, H), which predicts the first draft token."""
    start = s.length - s.pending_tokens.shape[0]
    positions = torch.arange(start, s.length)
    out, _ = head(head.fuse(s.pending_features[None]), embed(s.pending_tokens[None]), positions,
                  s.draft_cache)
    s.pending_features, s.pending_tokens = s.pending_features[:0], s.pending_tokens[:0]
    return out[:, -1:]


def start(target: Target, prompt_ids: list[int], params: DecodeConfig, gen, capture: bool = False) -> _State:
    """Prefill; the loop starts with every prompt position pending for the draft."""
    cache, out, y = prefill(target, prompt_ids, params, gen)
    ids = torch.tensor(prompt_ids)
    return _State(cache, DraftCache(), len(prompt_ids), y, out.features, torch.cat((ids[1:], torch.tensor([y]))),
                  [*prompt_ids, y], [(out.features, out.final_hidden)] if capture else [])


def propose(head: DraftHead, embed, s: _State, params: DecodeConfig, k: int, gen, tops: list | None = None):
    """Draft up to k tokens: the first always, each further one while the draft's own probability
    of the chain so far stays at or above `params.draft_threshold` (a chain the head is unsure of
    costs verify width and is rarely accepted). Returns target ids (n,) and, when sampling, their
    distributions (n, V). The length depends on the draft alone, so acceptance stays lossless.
    tops (greedy): receives the head's TOPS best target ids at each position, for the policy."""
    last = feed_pending(head, embed, s)  # (1, 1, H)
    tokens, probs = [], []
    target_ids = head.target_ids if params.temperature > 0 else None
    chain_p = 1.0
    for i in range(k):
        logits = head.logits(last)[0, -1].float()  # (Vd,)
        if params.temperature == 0:
            if tops is not None:
                tops.append(head.to_target_ids(logits.topk(TOPS).indices).tolist())
            d = int(logits.argmax())
            if params.draft_threshold > 0:
                chain_p *= float(torch.softmax(logits, dim=-1)[d])
        else:
            q = torch.softmax(logits / params.temperature, dim=-1)
            d = int(torch.multinomial(q, 1, generator=gen))
            chain_p *= float(q[d])
        if i > 0 and chain_p < params.draft_threshold:
            break
        if params.temperature > 0:
            full = torch.zeros(head.config.target_vocab_size)
            probs.append(full.index_copy_(0, target_ids, q))
        t = int(d + head.d2t[d])
        tokens.append(t)
        if i < k - 1:
            last, _ = head(last, embed(torch.tensor([[t]])), torch.tensor([s.length + i]),
                           s.draft_cache)
    return torch.tensor(tokens), (torch.stack(probs) if probs else None)


def verify(target: Target, s: _State, draft_tokens: torch.Tensor) -> TargetOut:
    ids = torch.cat((torch.tensor([s.next_token]), draft_tokens))[None]  # (1, k+1)
    return target_forward(target, ids, s.target_cache)


def verify_tree(target: Target, s: _State, tree: DraftTree) -> TargetOut:
    ids, positions, mask = verify_inputs(tree, s.next_token, s.length, target.model.dtype)
    return target_forward(target, ids, s.target_cache, position_ids=positions, attention_mask=mask)


def accept(out: TargetOut, draft_tokens, draft_probs, params: DecodeConfig, gen):
    if params.temperature == 0:
        return accept_greedy(draft_tokens, out.logits)
    p = target_probs(out.logits, params.temperature, params.top_p, params.top_k)
    return accept_sampling(draft_tokens, draft_probs, p, gen)


def commit(s: _State, out: TargetOut, rows: list[int], accepted: torch.Tensor, z: int, capture: bool):
    """Keep the verified positions in both caches: `rows` of the verify input (y, then the
    accepted draft tokens `accepted`; a prefix for a chain, a path for a tree). They join the
    draft's pending entries (after those it has not read, when the head sat this pass out)."""
    keep_cache_rows(s.target_cache, s.length, rows)
    s.draft_cache.crop(s.length)
    features, tokens = out.features[rows], torch.cat((accepted, torch.tensor([z])))
    s.pending_features = torch.cat((s.pending_features, features))
    s.pending_tokens = torch.cat((s.pending_tokens, tokens))
    if capture:
        s.captured.append((features, out.final_hidden[rows]))
    s.length += len(rows)
    s.next_token = z
    s.sequence.extend(tokens.tolist())


class _Emitter:
    """Hands each newly final token to a streaming callback exactly once. The callback returns
    True to end decoding there (a stop string appeared): finish reason "stop"."""

    def __init__(self, fn):
        self.fn, self.sent = fn, 0

    def __call__(self, new: list[int]) -> bool:
        if self.fn is not None and len(new) > self.sent:
            end = self.fn(new[self.sent :])
            self.sent = len(new)
            return bool(end)
        return False


def _finish(new: list[int], eos: set[int], max_new: int) -> tuple[list[int], str | None]:
    for i, t in enumerate(new[:max_new]):
        if t in eos:
            return new[: i + 1], "stop"
    if len(new) >= max_new:
        return new[:max_new], "length"
    return new, None


def draft_offers(sequence: list[int], params: DecodeConfig, history: AnswerHistory | None, room: int) -> dict:
    """What the text offers as a draft this pass, by source (tide.policy): the answer history's
    copy of an earlier answer (12+ tokens agree) and its counted chain, prompt lookup's copy (2-3
    tokens agree). Sources that find nothing are left out."""
    offers = {}
    if params.history_k and history is not None:
        hk = min(params.history_k, room)
        if copied := history.copy(sequence, hk):
            offers[RECALL] = copied
        if chain := history.chain(sequence, hk):
            offers[HISTORY] = chain
    if params.lookup_ngram:
        looked = lookup_draft(torch.tensor(sequence), params.lookup_ngram, params.lookup_min_ngram,
                              min(params.k, room), min(params.lookup_k, room))
        if looked is not None:
            offers[LOOKUP] = looked.tolist()
    return offers


@torch.inference_mode()
def speculative_generate(target: Target, head: DraftHead, prompt_ids: list[int],
                         params: DecodeConfig, max_context: int = 2048,
                         capture: bool = False, on_tokens=None, history: AnswerHistory | None = None,
                         policy=None, on_pass=None) -> Generation:
    """on_tokens(list[int]) receives the newly final tokens after every verify pass (streaming);
    when it returns True decoding ends there (finish reason "stop").
    history: earlier answers that draft too (used when params.history_k > 0; the caller adds the
    answers, see tide.lookup.AnswerHistory). policy: what each pass drafts (tide.policy; None:
    the configured order, FixedPolicy). on_pass(): called before every pass, where a replica
    swaps in new draft weights."""
    _check_room(target, len(prompt_ids), max_context)
    gen = _generator(params)
    policy = policy if policy is not None else FixedPolicy(params)
    t0 = time.perf_counter()
    s = start(target, prompt_ids, params, gen, capture)
    y = s.next_token
    g = Generation(tokens=[], finish_reason="length", prompt_len=len(prompt_ids),
                   accepted_per_pos=[0] * params.k, prefill_s=time.perf_counter() - t0)
    new, reason = _finish([y], target.eos_ids, params.max_new_tokens)
    emit = _Emitter(on_tokens)
    embed = target.embed
    greedy = params.temperature == 0  # sampling keeps chains (trees are greedy only)
    vocab = head.config.target_vocab_size
    while reason is None:
        if emit(new):
            reason = "stop"
            break
        if on_pass is not None:
            on_pass()
        room = max_context - s.length - 1
        if room < 1:
            reason = "length"
            break
        t0 = time.perf_counter()
        tops = [] if greedy else None
        offers = draft_offers(s.sequence, params, history, room)
        choice = policy.choose(offers, room, greedy, int(s.pending_tokens.shape[0]))
        if choice.source == TREE:
            dt = propose_tree(head, embed, feed_pending(head, embed, s), s.draft_cache, s.length, *choice.shape)
            t1 = time.perf_counter()
            out = verify_tree(target, s, dt)
            path, z = accept_tree_greedy(dt, out.logits)
            a, drafted = len(path), len(dt)
            head_view = chain_view(dt, path)
            commit(s, out, [0, *(i + 1 for i in path)], dt.tokens[path], z, capture)
        else:
            if choice.source == HEAD:
                draft_tokens, draft_probs = propose(head, embed, s, params, choice.length, gen, tops)
                if len(draft_tokens) < choice.length:  # cut by decode.draft_threshold
                    choice = replace(choice, length=len(draft_tokens))
            else:  # copied tokens, or none: the head sits this pass out; under sampling a copy's
                # draft distribution puts all its mass on the copied token
                draft_tokens = torch.tensor(offers.get(choice.source, [])[: choice.length], dtype=torch.long)
                draft_probs = None if greedy else torch.nn.functional.one_hot(draft_tokens, vocab).float()
            t1 = time.perf_counter()
            out = verify(target, s, draft_tokens)
            a, z = accept(out, draft_tokens, draft_probs, params, gen)
            drafted = len(draft_tokens)
            commit(s, out, list(range(a + 1)), draft_tokens[:a], z, capture)
            # the head's chain: where the target's token stood among its best at the first miss
            miss = tops[a] if tops and a < len(tops) else ()
            head_view = (drafted, a, miss.index(z) if z in miss else None) if choice.source == HEAD else None
        t2 = time.perf_counter()
        policy.observe(choice, a, t1 - t0, t2 - t1, head_view)
        if choice.source in (RECALL, HISTORY):
            g.history_passes += 1
            g.history_accepted += a
        elif choice.source == LOOKUP:
            g.lookup_passes += 1
            g.lookup_accepted += a
        elif choice.source == NONE:
            g.plain_passes += 1
        g.draft_s += t1 - t0
        g.verify_s += t2 - t1
        g.passes += 1
        g.drafted += drafted
        g.accepted += a
        for i in range(min(a, params.k)):
            g.accepted_per_pos[i] += 1
        new, reason = _finish(s.sequence[len(prompt_ids):], target.eos_ids, params.max_new_tokens)
    emit(new)
    g.tokens, g.finish_reason = new, reason
    if capture:
        g.sequence = s.sequence
        g.features = torch.cat([f for f, _ in s.captured])
        g.final_hidden = torch.cat([h for _, h in s.captured])
    return g


@torch.inference_mode()
def target_generate(target: Target, prompt_ids: list[int], params: DecodeConfig,
                    max_context: int = 2048, on_tokens=None) -> Generation:
    """The baseline: the target alone, one token per forward pass."""
    _check_room(target, len(prompt_ids), max_context)
    gen = _generator(params)
    t0 = time.perf_counter()
    cache, _, y = prefill(target, prompt_ids, params, gen, hidden=False)
    g = Generation(tokens=[], finish_reason="length", prompt_len=len(prompt_ids),
                   prefill_s=time.perf_counter() - t0)
    seq = [y]
    new, reason = _finish(seq, target.eos_ids, params.max_new_tokens)
    emit = _Emitter(on_tokens)
    t0 = time.perf_counter()
    while reason is None:
        if emit(new):
            reason = "stop"
            break
        if len(prompt_ids) + len(seq) >= max_context:
            reason = "length"
            break
        out = target_forward(target, torch.tensor([[seq[-1]]]), cache, hidden=False)
        seq.append(sample_token(out.logits[-1], params, gen))
        g.passes += 1
        new, reason = _finish(seq, target.eos_ids, params.max_new_tokens)
    g.verify_s = time.perf_counter() - t0
    emit(new)
    g.tokens, g.finish_reason = new, reason
    return g
