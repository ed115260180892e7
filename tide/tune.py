"""`tide tune`: which chain settings pay on this machine, from a replay instead of a sweep.

Speculation pays when the tokens a pass gains outweigh what the pass costs. Both sides depend on
the machine (what a verify pass of w tokens costs against one target step: on a CPU it grows
with w, on a GPU it hardly does) and on the draft (how often its chains are right, how sure it
is of them). A sweep of real runs over the settings takes hours on a CPU; the replay takes
minutes and prices every setting on the same answers:

1. the target answers the prompts greedily: its own tokens, which every lossless setting
   reproduces, and the features the draft reads;
2. at every position of each answer, the draft's chain of up to `max_k` tokens and its
   probability of each, through the draft's own cache as in decode (tide.speculative.propose);
3. this machine's cost of the target alone (one step), of a verify pass of 1..W tokens, of a
   draft step and of a prompt lookup, measured here;
4. each setting walks every answer pass by pass as tide.speculative does (prompt lookup first
   when on, else the head's chain cut where its probability falls below `draft_threshold`),
   accepts the longest prefix that matches the answer and adds up what the passes cost.

With an answer history (`decode.history_k` > 0 and its seed, serving.history_records), every
setting with prompt lookup also runs with the history: its copies before lookup, its chains
where lookup finds none; the history learns each answer after its replay, as a replica learns
a served one. Its copies are priced for every match length in MATCH_NGRAMS and the configured
`serving.history_match_ngram` (0: chains only), each on a history of the same answers.

Beside the chains, draft trees (tide.tree) are priced the same way: at every state the head
drafts each tree shape in TREE_SHAPES (`decode.k` levels deep, `decode.tree_topk` expanded per
level, `decode.tree_tokens` verified) exactly as decode does, and the replay accepts the path of
the tree that the answer follows. One-level trees (`decode.k=1 decode.tree_topk=t
decode.tree_tokens=t`: the head's t likeliest next tokens checked in one pass, TREE_WIDTHS) are
the cheapest; deeper ones accept more per pass and cost more draft calls and a wider pass. Their
draft is timed as it runs here, their verify pass measured with a tree mask of each width.

Predicted speedup: answer tokens x one target step / the passes' cost (decode only; prefill is
the same for both and left out). A setting is `bit_exact` when its widest pass gets single-step
bits on this machine (fp32; bf16 on tide's kernels, which on AVX512-BF16 CPUs without AMX take
passes of up to 128 rows): `best` is the fastest such setting, `best_any` the fastest of all. Greedy chains
only: sampling is not replayed. Tune on prompts the head did not train on
(`--holdout`: the warm start's held-out prompts), then check the pick with `tide bench`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import DynamicCache

from tide.config import DecodeConfig
from tide.draft_head import DraftCache, DraftHead
from tide.kernels import ALL_ROWS, kernel_rows
from tide.lookup import AnswerHistory, lookup_draft
from tide.models import Target
from tide.policy import HEAD, HISTORY, LOOKUP, RECALL, TREE, Costs, FixedPolicy, measure_costs
from tide.speculative import target_forward, target_generate
from tide.tree import DraftTree, follow, propose_tree

log = logging.getLogger(__name__)

THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.5)
NARROW = 7  # copies and chains of up to 7 tokens: passes of at most 8 rows (about one step on most CPUs)
LOOKUP_KS = (0, NARROW, 8, 12, 16)  # 0: copies of k tokens
TREE_WIDTHS = (2, 3, 4)  # one-level trees: the head's top-t next tokens in one pass
# deeper trees, (depth, topk, tree_tokens): decode.k, decode.tree_topk, decode.tree_tokens
TREE_SHAPES = ((2, 3, 4), (3, 4, 8), (3, 5, 10), (4, 4, 12), (5, 4, 16), (6, 6, 24))
MATCH_NGRAMS = (0, 4, 6, 8, 12, 16)  # the history's copies: how many of the text's last tokens must match; 0 = none


@dataclass
class Answer:
    ids: list[int]  # x_0..x_T: prompt, then the target's greedy answer
    prompt_len: int
    chains: torch.Tensor  # (T - prompt_len + 1, max_k) the head's chain at state L = prompt_len + row
    probs: torch.Tensor  # (T - prompt_len + 1, max_k) its probability of each token
    trees: dict = field(default_factory=dict)  # (depth, topk, tree_tokens) -> the head's tree at each state
    tree_ms: dict = field(default_factory=dict)  # (depth, topk, tree_tokens) -> time its drafts took here


@dataclass
class Setting:
    k: int
    draft_threshold: float
    lookup_ngram: int
    lookup_min_ngram: int
    lookup_k: int
    history_k: int = 0
    history_match_ngram: int = 12  # serving.history_match_ngram, read where history_k > 0
    tree: int = 0  # > 1: the head drafts a tree, k levels deep, this many tokens expanded per level
    tree_tokens: int = 0  # the tree's nodes verified (0: `tree`, a one-level tree when k = 1)

    def __post_init__(self):
        if self.tree and not self.tree_tokens:
            self.tree_tokens = self.tree

    def shape(self) -> tuple[int, int, int]:
        return self.k, self.tree, self.tree_tokens

    def widest_pass(self) -> int:
        """Rows of the widest verify pass this setting makes: y and its longest draft."""
        head = self.tree_tokens if self.tree else self.k
        return 1 + max(head, self.lookup_k if self.lookup_ngram else 0, self.history_k)

    def overrides(self) -> str:
        out = f"decode.k={self.k} decode.draft_threshold={self.draft_threshold}"
        if self.lookup_ngram:
            out += (f" decode.lookup_ngram={self.lookup_ngram} decode.lookup_min_ngram={self.lookup_min_ngram}"
                    f" decode.lookup_k={self.lookup_k}")
        out += f" decode.history_k={self.history_k} decode.tree_topk={self.tree}"
        out += f" decode.tree_tokens={self.tree_tokens}" if self.tree else ""
        return out + (f" serving.history_match_ngram={self.history_match_ngram}" if self.history_k else "")


@torch.inference_mode()
def answer(target: Target, head: DraftHead, prompt_ids: list[int], params: DecodeConfig, max_context: int,
           max_k: int, tree_shapes=()) -> Answer:
    """The target's greedy answer, and the head's chain and its tree of each shape (depth,
    topk, tree_tokens) at every state of it."""
    g = target_generate(target, prompt_ids, replace(params, temperature=0.0), max_context)
    ids = [*prompt_ids, *g.tokens]
    n = len(ids) - 1  # features of positions 0..n-1 (the last token is never fed)
    feats = target_forward(target, torch.tensor([ids[:-1]]), DynamicCache(config=target.config)).features
    x, embed, cache = torch.tensor(ids), target.embed, DraftCache()
    first = len(prompt_ids) - 1  # entry p reads (f_p, x_{p+1}); entry L-1 starts the chain at state L
    if first > 0:
        head(head.fuse(feats[None, :first]), embed(x[None, 1 : first + 1]), torch.arange(first), cache)
    chains = torch.zeros(n - first, max_k, dtype=torch.long)
    probs = torch.zeros(n - first, max_k)
    trees: dict[tuple, list[DraftTree]] = {shape: [] for shape in tree_shapes}
    tree_ms = dict.fromkeys(tree_shapes, 0.0)
    for row, p in enumerate(range(first, n)):
        last, _ = head(head.fuse(feats[None, p : p + 1]), embed(x[None, p + 1 : p + 2]), torch.tensor([p]), cache)
        h = last
        for i in range(max_k):
            q = torch.softmax(head.logits(h)[0, -1].float(), dim=-1)
            d = int(q.argmax())
            chains[row, i], probs[row, i] = int(head.to_target_ids(torch.tensor(d))), q[d]
            if i < max_k - 1:
                h, _ = head(h, embed(chains[row, i].view(1, 1)), torch.tensor([p + 1 + i]), cache)
        cache.crop(p + 1)
        for shape in tree_shapes:  # as decode drafts it: the cache holds the p + 1 verified entries
            t0 = time.perf_counter()
            trees[shape].append(propose_tree(head, embed, last, cache, p + 1, *shape))
            tree_ms[shape] += 1000 * (time.perf_counter() - t0)
            cache.crop(p + 1)
    return Answer(ids, len(prompt_ids), chains, probs, trees, tree_ms)


def chain_length(probs: torch.Tensor, k: int, threshold: float) -> int:
    """How many of the chain's tokens propose() keeps: the first always, then while the product
    of the draft's probabilities stays at or above the threshold."""
    if threshold <= 0:
        return k
    run = torch.cumprod(probs[:k], 0)
    return max(1, int((run >= threshold).cumprod(0).sum()))


def replay(answers: list[Answer], s: Setting, c: Costs, lookups: dict, recalls: dict | None = None) -> dict:
    """Walk every answer pass by pass under setting s; returns tokens, passes and their cost.
    recalls[(answer, L)]: the history's (copy, chain) at that state, either None (the longest
    ones; a setting reads their first history_k tokens). The order is the loop's: the history's
    copy, prompt lookup, the history's chain, the head."""
    tokens = passes = lookup_passes = history_passes = drafted = 0
    ms = 0.0
    policy = FixedPolicy(DecodeConfig(k=s.k, tree_topk=s.tree, tree_tokens=s.tree_tokens or 16))
    searched = (c.lookup if s.lookup_ngram else 0.0) + (c.history if s.history_k else 0.0)
    for ai, a in enumerate(answers):
        L, T = a.prompt_len, len(a.ids) - 1
        while L < T:  # y = x_L is known; x_{L+1}.. is the truth the drafts are checked against
            h_copy, h_chain = (recalls or {}).get((ai, L), (None, None)) if s.history_k else (None, None)
            offers = {RECALL: (h_copy or [])[: s.history_k], HISTORY: (h_chain or [])[: s.history_k]}
            if s.lookup_ngram:
                offers[LOOKUP] = lookups.get((ai, L, s.lookup_ngram, s.lookup_min_ngram, s.k, s.lookup_k))
            choice = policy.choose(offers, T, tree_ok=True)  # as decode chooses (room: no limit here)
            if choice.source == TREE:  # the path the answer follows
                tree = a.trees[s.shape()][L - a.prompt_len]
                truth = a.ids[L + 1 : L + 1 + s.k]
                acc = len(follow(tree, lambda node, depth: truth[depth] if depth < len(truth) else None))
                ms += searched + c.draft_call + c.tree_draft[s.shape()] + c.tree_verify[len(tree) + 1]
                drafted += len(tree)
            else:
                if choice.source == HEAD:
                    row = L - a.prompt_len
                    w = chain_length(a.probs[row], s.k, s.draft_threshold)
                    draft, cost = a.chains[row, :w].tolist(), c.chain_draft_ms(w, s.k)
                else:
                    draft, cost = offers[choice.source], 0.0
                    lookup_passes += choice.source == LOOKUP
                    history_passes += choice.source != LOOKUP
                truth, acc = a.ids[L + 1 : L + 1 + len(draft)], 0
                while acc < len(truth) and draft[acc] == truth[acc]:
                    acc += 1
                ms += searched + cost + c.verify[len(draft) + 1]
                drafted += len(draft)
            tokens += min(acc + 1, T - L)
            passes += 1
            L += acc + 1
    return {"tokens": tokens, "passes": passes, "lookup_passes": lookup_passes, "history_passes": history_passes,
            "drafted": drafted, "ms": ms}


def lookup_table(answers: list[Answer], settings: list[Setting]) -> tuple[dict, float]:
    """Prompt lookup's copy at every state, for every lookup setting in use; and the
    mean time of one search (ms)."""
    table, spent, calls = {}, 0.0, 0
    keys = sorted({(s.lookup_ngram, s.lookup_min_ngram, s.k, s.lookup_k) for s in settings if s.lookup_ngram})
    for ai, a in enumerate(answers):
        x = torch.tensor(a.ids)
        for key in keys:
            for L in range(a.prompt_len, len(a.ids) - 1):
                t0 = time.perf_counter()
                copy = lookup_draft(x[: L + 1], *key)
                spent += time.perf_counter() - t0
                calls += 1
                if copy is not None:
                    table[(ai, L, *key)] = copy.tolist()
    return table, 1000 * spent / max(calls, 1)


def history_table(answers: list[Answer], history: AnswerHistory, history_k: int) -> tuple[dict, float]:
    """The history's (copy, chain) at every state of each answer where it has either, the
    history learning each answer after it (as a replica learns what it served); and the mean
    time of one search for both (ms)."""
    table, spent, calls = {}, 0.0, 0
    for ai, a in enumerate(answers):
        for L in range(a.prompt_len, len(a.ids) - 1):
            t0 = time.perf_counter()
            found = history.copy(a.ids[: L + 1], history_k), history.chain(a.ids[: L + 1], history_k)
            spent += time.perf_counter() - t0
            calls += 1
            if any(found):
                table[(ai, L)] = found
        history.add(a.ids[: a.prompt_len], a.ids[a.prompt_len :])
    return table, 1000 * spent / max(calls, 1)


def exact_rows(target: Target) -> int:
    """The widest pass whose rows get single-step bits on this machine: every pass in fp32; in
    bf16 the passes tide's kernels take (tide.kernels.kernel_rows; 0 where torch's bf16 path
    runs them all, which is not bit-stable across widths)."""
    if target.dtype != torch.bfloat16:
        return ALL_ROWS
    return kernel_rows(target.bf16_kernel) if target.skinny_matmul else 0


def settings_grid(max_k: int, ngram: int, min_ngram: int, history_k: int = 0,
                  match_ngrams: tuple[int, ...] = (12,), tree_shapes=TREE_SHAPES) -> list[Setting]:
    """Chains of 1..max_k (with each draft threshold), one-level trees (TREE_WIDTHS) and the
    deeper tree_shapes, each alone and beside prompt lookup (and the history's drafts)."""
    heads = [(k, th, 0, 0) for k in range(1, max_k + 1) for th in (THRESHOLDS if k > 1 else (0.0,))]
    heads += [(1, 0.0, t, t) for t in TREE_WIDTHS] + [(d, 0.0, t, n) for d, t, n in tree_shapes]
    grid = []
    for k, th, tree, nodes in heads:
        grid.append(Setting(k, th, 0, min_ngram, 0, tree=tree, tree_tokens=nodes))
        if ngram:
            grid += [Setting(k, th, ngram, min_ngram, lk, tree=tree, tree_tokens=nodes)
                     for lk in LOOKUP_KS if lk == 0 or lk > k]
    if history_k:  # the history beside every lookup setting, also with chains the kernels' passes take
        with_lookup = [s for s in grid if s.lookup_ngram]
        for hk in sorted({history_k, min(history_k, NARROW)}):
            grid += [replace(s, history_k=hk, history_match_ngram=m) for m in match_ngrams for s in with_lookup]
    return grid


def run_tune(target: Target, head: DraftHead, prompts: list[list[int]], params: DecodeConfig,
             max_context: int, max_k: int, lookup_ngram: int = 3, lookup_min_ngram: int = 2,
             history: AnswerHistory | None = None, match_ngrams: tuple[int, ...] | None = None,
             tree_shapes=TREE_SHAPES) -> dict:
    """prompts: token ids; answers run to params.max_new_tokens. With a history (and
    params.history_k > 0), the lookup settings are also priced with its chains. Returns the
    measured costs and every setting's predicted figures, best first. The history's copies are
    priced for each of match_ngrams (default: MATCH_NGRAMS and the history's own), on
    history.rebuilt(n): build the seed with the largest, so that each keeps the prompt tokens
    a history built with it would. tree_shapes: the (depth, topk, tree_tokens) trees priced
    beside the one-level trees."""
    answers = []
    shapes = sorted({(1, t, t) for t in TREE_WIDTHS} | set(tree_shapes))
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        answers.append(answer(target, head, ids, params, max_context, max_k, shapes))
        log.info("[%d/%d] answered and replayed the head's chains and trees (%.0f s)", i + 1, len(prompts),
                 time.perf_counter() - t0)
    history_k = params.history_k if history is not None else 0
    if history_k:
        match_ngrams = tuple(sorted(set(match_ngrams or (*MATCH_NGRAMS, history.match_ngram))))
    grid = settings_grid(max_k, lookup_ngram, lookup_min_ngram, history_k, match_ngrams or (), tree_shapes)
    lookups, lookup_ms = lookup_table(answers, grid)
    recalls, history_ms = {}, {}  # by match_ngram
    for n in match_ngrams if history_k else ():
        recalls[n], history_ms[n] = history_table(answers, history.rebuilt(n), history_k)
    widest = max(max_k, *LOOKUP_KS) + 1
    context = max(answers, key=lambda a: len(a.ids)).ids
    sample_trees = {len(t) + 1: t for a in answers for trees in a.trees.values() for t in trees}
    log.info("measuring verify passes of 1..%d tokens and tree passes of %s on a %d-token context", widest,
             "/".join(map(str, sorted(sample_trees))), len(context))
    costs = measure_costs(target, head, context, widest, trees=sample_trees)
    drafts = sum(len(a.ids) - a.prompt_len for a in answers)  # states: one tree of each shape at each
    costs.tree_draft = {shape: sum(a.tree_ms[shape] for a in answers) / drafts for shape in shapes}
    costs.lookup, costs.history = lookup_ms, history_ms.get(history.match_ngram, 0.0) if history_k else 0.0
    limit = exact_rows(target)  # wider passes than this are not token-identical to the target alone
    rows = []
    for s in grid:
        n = s.history_match_ngram
        r = replay(answers, s, replace(costs, history=history_ms.get(n, 0.0)), lookups, recalls.get(n))
        rows.append({**asdict(s), "overrides": s.overrides(),
                     "predicted_speedup": round(r["tokens"] * costs.target_step / r["ms"], 3),
                     "mean_accept_len": round(r["tokens"] / r["passes"], 3),
                     "lookup_pass_share": round(r["lookup_passes"] / r["passes"], 3),
                     "history_pass_share": round(r["history_passes"] / r["passes"], 3),
                     "bit_exact": s.widest_pass() <= limit})
    rows.sort(key=lambda r: -r["predicted_speedup"])
    exact = [r for r in rows if r["bit_exact"]]
    return {"n_prompts": len(answers), "answer_tokens": sum(len(a.ids) - a.prompt_len for a in answers),
            "costs_ms": {**asdict(costs), "verify": [round(v, 2) for v in costs.verify],
                         "tree_draft": {":".join(map(str, k)): round(v, 3) for k, v in costs.tree_draft.items()},
                         "tree_verify": {w: round(v, 2) for w, v in sorted(costs.tree_verify.items())}},
            "exact_rows": limit if limit < ALL_ROWS else None, "best": (exact or rows)[0]["overrides"],
            "best_any": rows[0]["overrides"], "settings": rows}
