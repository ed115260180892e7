"""The speculation controller: every verify pass takes the draft with the best expected speed.

TIDE (arXiv:2602.05145) prices a chain of g draft tokens, each accepted with probability a, as

    S = (1 - a^(g+1)) / ((1 - a)(c g + b))

tokens per target step: the numerator is the expected tokens of a pass (accepted drafts, +1 for
the recovered or bonus token), the denominator what the pass costs (c per draft token, b for the
verify pass, both in target steps). tide has more draft sources than one chain, and on a CPU a
verify pass costs more the wider it is, so the controller prices every option the same way:

    E[tokens]  = 1 + sum_{j=1..g} prod_{i<=j} r_i(source)      r_i: acceptance of position i,
                                                               given the ones before it
    cost (ms)  = draft(option) + verify(width of the pass)     measured on this machine
    pick         argmax E[tokens] / cost

over: no speculation (a pass of one row: what the target alone does), the head's chain of
g = 1..k, each draft tree shape (its mean accepted tokens), and where the text offers one, a
prompt-lookup copy or the answer history's copy or chain, cut to the best length. Acceptance is
tracked online per source and position (decayed counts, so an option not taken drifts back to
its prior and is tried again: a draft that improves is noticed); costs are measured at startup
(`measure_costs`). A cold or stale draft then costs one draft row now and then, a good one is
used fully, on any CPU. Whatever is drafted, the target decides every token: the output does not
depend on the policy.

`FixedPolicy` is the configured order (the answer history's copy, prompt lookup, its chain, then
the head's tree or chain of `decode.k`): `decode.policy=fixed`, and what `tide tune` replays.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from tide.config import DecodeConfig
from tide.draft_head import DraftCache, DraftHead
from tide.lookup import lookup_draft
from tide.models import Target
from tide.tree import keep_cache_rows, propose_tree, verify_inputs

# sources of a draft; copies come from the text, the head drafts a chain or a tree
NONE, HEAD, TREE, LOOKUP, RECALL, HISTORY = "none", "head", "tree", "lookup", "recall", "history"
COPIES = (RECALL, LOOKUP, HISTORY)  # RECALL: the history's copy of an earlier answer; HISTORY: its chain


@dataclass(frozen=True)
class Choice:
    """What one verify pass checks: `length` draft tokens from `source` (a tree: its nodes)."""

    source: str
    length: int = 0
    shape: tuple[int, int, int] | None = None  # a tree's (depth, topk, nodes)
    expected: float = 1.0  # tokens the policy expects from the pass (accepted + 1)
    cost_ms: float = 0.0  # what it expects the pass to cost

    @property
    def label(self) -> str:
        if self.source == TREE:
            return "tree:" + ":".join(map(str, self.shape))
        return self.source if self.source == NONE else f"{self.source}:{self.length}"


BACKLOG_PASSES = 8


@dataclass
class Costs:
    """Milliseconds on this machine, medians of interleaved repeats."""

    target_step: float  # the target alone: one token, no hidden states
    verify: list[float]  # verify[w]: a pass of w tokens (y and w - 1 drafts) with hidden states
    draft_call: float  # one draft layer call over one position
    draft_logits: float  # the draft's LM head and softmax for one position
    lookup: float = 0.0  # one prompt-lookup search
    feed_pos: float = 0.0  # each further position one draft call reads (a backlog the head has not read)
    history: float = 0.0  # one answer-history search (tune measures it during its replay)
    tree_draft: dict = field(default_factory=dict)  # (depth, topk, nodes) -> one propose_tree
    tree_verify: dict = field(default_factory=dict)  # width -> a pass over [y, nodes] with a tree mask
    wide: dict = field(default_factory=dict)  # rows -> a pass wider than `verify` holds (a batch's)

    def verify_ms(self, width: int) -> float:
        return self.verify[min(width, len(self.verify) - 1)]

    def rows_ms(self, rows: int) -> float:
        """A pass over `rows` rows in all (a batch: every request's y and drafts), linear between
        the measured widths and past the widest: a batched pass's linears see B * n rows as one
        pass of that many does (attention, per row, is the small part on these models)."""
        if rows < len(self.verify):
            return self.verify[max(rows, 1)]
        points = [(w, ms) for w, ms in enumerate(self.verify) if w] + sorted(self.wide.items())
        (w0, m0), (w1, m1) = points[-2], points[-1]
        for (a, ma), (b, mb) in zip(points, points[1:]):
            if a <= rows <= b:
                (w0, m0), (w1, m1) = (a, ma), (b, mb)
                break
        return m0 + (m1 - m0) * (rows - w0) / max(w1 - w0, 1)

    def chain_draft_ms(self, drafted: int, k: int | None = None) -> float:
        """propose() for a chain of `drafted` of k tokens: one call feeds the verified positions,
        one call per further token, and the LM head per token looked at (one more where the chain
        is cut)."""
        n = drafted + (k is not None and drafted < k)
        return (self.draft_call + self.draft_logits) * n

    def feed_ms(self, backlog: int) -> float:
        """What reading a backlog of verified positions adds to a head draft beyond the one
        position its first call always reads (positions pile up while a row drafts otherwise or
        not at all), charged over the BACKLOG_PASSES passes it serves: priced whole, a backlog
        that grew while the head did not pay would keep it out after it does."""
        return self.feed_pos * max(0, backlog - 1) / BACKLOG_PASSES

    def tree_ms(self, shape: tuple[int, int, int]) -> float:
        """A tree pass: feeding the verified positions, drafting the tree, verifying it."""
        width = shape[2] + 1
        return self.draft_call + self.tree_draft[shape] + self.tree_verify.get(width, self.verify_ms(width))


@torch.inference_mode()
def measure_costs(target: Target, head: DraftHead, context: list[int], max_width: int, reps: int = 7,
                  shapes=(), trees: dict | None = None, wide=()) -> Costs:
    """This machine's costs on a `context`-token text. Interleaved repeats (every width once per
    round) so that machine noise hits all alike. shapes: tree shapes (depth, topk, nodes) whose
    draft is timed and whose verify pass is timed with its tree mask; trees: more trees by width
    to time the verify pass of (tune passes the ones it replays); wide: wider passes to time (up
    to the context's length), what a batch of requests costs (Costs.rows_ms)."""
    from tide.speculative import target_forward  # tide.speculative imports this module

    cache = DynamicCache(config=target.config)
    target_forward(target, torch.tensor([context]), cache, hidden=False)
    n = len(context)
    embed, x = target.embed, torch.tensor(context)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)

    def step(width: int, hidden: bool):
        target_forward(target, x[None, -width:], cache, hidden=hidden)
        keep_cache_rows(cache, n, [])

    def tree_step(tree):
        ids, positions, mask = verify_inputs(tree, context[-1], n, target.model.dtype)
        target_forward(target, ids, cache, position_ids=positions, attention_mask=mask)
        keep_cache_rows(cache, n, [])

    draft_cache = DraftCache()
    feats = target_forward(target, x[None, :-1], DynamicCache(config=target.config)).features
    head(head.fuse(feats[None, :-1]), embed(x[None, 1:-1]), torch.arange(n - 2), draft_cache)
    hidden = head.fuse(feats[None, -1:])

    def draft_call():
        head(hidden, embed(x[None, -1:]), torch.tensor([n - 2]), draft_cache)
        draft_cache.crop(n - 2)

    backlog = min(32, n - 2)
    hidden_backlog = head.fuse(feats[None, -backlog:])

    def feed_backlog():
        head(hidden_backlog, embed(x[None, -backlog:]), torch.arange(n - 2, n - 2 + backlog), draft_cache)
        draft_cache.crop(n - 2)

    def draft_logits():
        torch.softmax(head.logits(hidden)[0, -1].float(), dim=-1).argmax()

    def tree_draft(shape):
        last, _ = head(hidden, embed(x[None, -1:]), torch.tensor([n - 2]), draft_cache)
        tree = propose_tree(head, embed, last, draft_cache, n - 1, *shape)
        draft_cache.crop(n - 2)
        return tree

    trees = dict(trees or {})
    for shape in shapes:
        tree = tree_draft(shape)
        trees.setdefault(len(tree) + 1, tree)
    samples: dict = {}
    for rep in range(reps + 1):  # the first round warms caches and allocators up, and is dropped
        if rep == 1:
            samples.clear()
        samples.setdefault("step", []).append(timed(lambda: step(1, False)))
        for w in (*range(1, max_width + 1), *(w for w in wide if max_width < w <= n)):
            samples.setdefault(w, []).append(timed(lambda: step(w, True)))
        for w, tree in trees.items():
            samples.setdefault(("tree", w), []).append(timed(lambda: tree_step(tree)))
        for shape in shapes:
            samples.setdefault(("draft", shape), []).append(timed(lambda: tree_draft(shape)))
        samples.setdefault("call", []).append(timed(draft_call))
        samples.setdefault("feed", []).append(timed(feed_backlog))
        samples.setdefault("logits", []).append(timed(draft_logits))
        samples.setdefault("lookup", []).append(timed(lambda: lookup_draft(x, 3, 2, 5, 16)))
    med = {key: statistics.median(v) for key, v in samples.items()}
    return Costs(med["step"], [0.0] + [med[w] for w in range(1, max_width + 1)], med["call"], med["logits"],
                 lookup=med["lookup"], feed_pos=max(0.0, med["feed"] - med["call"]) / max(backlog - 1, 1),
                 # a tree draft as timed here includes the call that feeds the position
                 tree_draft={s: max(0.0, med[("draft", s)] - med["call"]) for s in shapes},
                 tree_verify={w: med[("tree", w)] for w in trees},
                 wide={w: med[w] for w in wide if max_width < w <= n})


TOPS = 4  # the head's chain passes record whether the target's token was among its best 1..TOPS


class Acceptance:
    """How often draft position i is accepted when the pass gets that far, as decayed counts over
    a prior: r_i = (ok_i + prior * r_{i-1}) / (reached_i + prior), r_{-1} = p0 (a position not
    seen yet is taken to do as well as the one before it, not better). For the head it also
    counts how often the target's token at i was among the head's best t (t = 1..TOPS), which
    prices the trees it could have drafted instead (a one-level tree of t accepts that often)."""

    def __init__(self, positions: int, p0: float = 0.5, prior: float = 2.0):
        self.p0, self.prior = p0, prior
        self.reached = [0.0] * positions
        self.hits = [[0.0] * positions for _ in range(TOPS)]  # hits[t - 1][i]: among the best t
        self._rates: dict[int, list[float]] = {}  # by t, until the counts change

    def rates(self, t: int = 1) -> list[float]:
        """P(the target's token at position i is among the head's best t | the pass got to i)."""
        t = min(t, TOPS)
        if t not in self._rates:
            out, prev = [], self.p0 + (1 - self.p0) * (t - 1) / TOPS
            for hits, reached in zip(self.hits[t - 1], self.reached):
                prev = (hits + self.prior * prev) / (reached + self.prior)
                out.append(prev)
            self._rates[t] = out
        return self._rates[t]

    def gains(self, n: int, widths=None) -> list[float]:
        """gains[g-1]: the accepted tokens a draft of g is expected to bring, g = 1..n; widths[i]:
        candidates at depth i (a tree's), 1 for a chain."""
        out, run, total = [], 1.0, 0.0
        for i in range(min(n, len(self.reached))):
            run *= self.rates(widths[i] if widths else 1)[i]
            total += run
            out.append(total)
        return out

    def observe(self, drafted: int, accepted: int, miss_rank: int | None = None) -> None:
        """miss_rank: where the target's token at the first rejected position stood among the
        draft's best (0-based; None: not known or not among them)."""
        for i in range(min(accepted + 1, drafted, len(self.reached))):
            self.reached[i] += 1.0
            for t in range(TOPS):
                self.hits[t][i] += float(i < accepted or (miss_rank is not None and miss_rank <= t))
        self._rates.clear()

    def decay(self, f: float) -> None:
        self.reached = [v * f for v in self.reached]
        self.hits = [[v * f for v in row] for row in self.hits]
        self._rates.clear()


def tree_widths(shape: tuple[int, int, int]) -> list[int]:
    """Candidates a tree (depth, topk, nodes) holds at each depth, roughly: topk at the first,
    the other nodes spread over the deeper levels (the tree keeps the likeliest paths)."""
    depth, topk, nodes = shape
    first = min(topk, nodes)
    rest = nodes - first
    return [first] + [max(1, min(topk, rest // (depth - 1))) for _ in range(depth - 1)]


class FixedPolicy:
    """The configured order: the history's copy, prompt lookup, the history's chain, then the
    head's tree (`decode.tree_topk` > 1, greedy) or chain of `decode.k`."""

    def __init__(self, params: DecodeConfig):
        self.params = params
        self.counts: dict[str, int] = {}

    def choose(self, offers: dict[str, list[int]], room: int, tree_ok: bool, backlog: int = 1) -> Choice:
        p = self.params
        for source in COPIES:
            if offers.get(source):
                return Choice(source, len(offers[source]))
        if tree_ok and p.tree_topk > 1:
            shape = (p.k, p.tree_topk, min(p.tree_tokens, room))
            return Choice(TREE, shape[2], shape)
        return Choice(HEAD, min(p.k, room))

    def observe(self, choice: Choice, accepted: int, draft_s: float, verify_s: float,
                head_view: tuple[int, int, int | None] | None = None) -> None:
        self.counts[choice.label] = self.counts.get(choice.label, 0) + 1

    def head_changed(self) -> None:
        pass

    def stats(self) -> dict:
        return {"policy": "fixed", "choices": dict(self.counts)}


class AdaptivePolicy:
    """Each pass: the option with the most expected tokens per millisecond (module docstring).

    costs: this machine's (measure_costs); max_k: the longest head chain; shapes: the tree shapes
    it may draft; decay: how much of the counts each pass keeps (0.995: about the last 200 passes
    weigh). Not thread-safe: one decode loop uses it at a time (the replica's decode lock)."""

    def __init__(self, costs: Costs, max_k: int, shapes=(), max_copy: int = 16, decay: float = 0.995,
                 seed: int = 0, search_ms: float = 0.0, refine: float = 0.1):
        self.costs, self.max_k, self.decay = costs, max_k, decay
        self.refine = refine  # each pass's measured times move the cost model this far towards them
        self.search_ms = search_ms  # what every pass spends looking for copies, whatever it drafts
        widest = len(costs.verify) - 2  # the widest measured pass checks this many drafts
        self.max_k = min(max_k, widest)
        self.max_copy = min(max_copy, widest)
        self.shapes = [s for s in shapes if s in costs.tree_draft and s[2] <= widest]
        self.sources = {HEAD: Acceptance(self.max_k), **{c: Acceptance(self.max_copy) for c in COPIES}}
        # a tree's mean accepted tokens (decayed sum, weight); its prior: the chain of its depth
        self.trees = {s: [0.0, 0.0] for s in self.shapes}
        self.counts: dict[str, int] = {}
        self.passes = self.batched = 0  # steps observed; of them, batched ones (2+ rows)
        self.predicted_tokens = self.tokens = 0.0
        self.predicted_ms = self.ms = 0.0
        self._gain = [0.0, 0.0]  # decayed: passes' ms, and what they would have cost without drafts
        self.rng = random.Random(seed)  # breaks exact ties only

    def _tree_gain(self, shape) -> float:
        """Observed mean accepted tokens of this tree, over a prior from the head's chain
        passes (how often the target's token was among its best t at each depth)."""
        total, weight = self.trees[shape]
        gains = self.sources[HEAD].gains(shape[0], tree_widths(shape))
        prior = gains[-1] if gains else 0.0
        return (total + prior) / (weight + 1.0)

    def options(self, offers: dict[str, list[int]], room: int, tree_ok: bool, backlog: int = 1) -> list[Choice]:
        """backlog: verified positions the head has not read yet (it reads them before drafting)."""
        c, base = self.costs, self.search_ms
        out = [Choice(NONE, 0, None, 1.0, base + c.verify_ms(1))]
        feed = c.feed_ms(backlog)
        for g, gain in enumerate(self.sources[HEAD].gains(min(self.max_k, room)), 1):
            out.append(Choice(HEAD, g, None, 1.0 + gain, base + feed + c.chain_draft_ms(g) + c.verify_ms(g + 1)))
        if tree_ok:
            for s in self.shapes:
                if s[2] <= room:
                    out.append(Choice(TREE, s[2], s, 1.0 + self._tree_gain(s), base + feed + c.tree_ms(s)))
        for source in COPIES:
            tokens = offers.get(source) or []
            for g, gain in enumerate(self.sources[source].gains(min(len(tokens), room, self.max_copy)), 1):
                out.append(Choice(source, g, None, 1.0 + gain, base + c.verify_ms(g + 1)))
        return out

    def choose(self, offers: dict[str, list[int]], room: int, tree_ok: bool, backlog: int = 1) -> Choice:
        return max(self.options(offers, room, tree_ok, backlog),
                   key=lambda o: (o.expected / o.cost_ms, self.rng.random()))

    def choose_batch(self, asks: list[tuple], extra: int = 0) -> list[Choice]:
        """One choice per row of a batched step (asks: each row's offers, room, tree_ok[, backlog]),
        for the most expected tokens per millisecond of the whole step:

            step ms = rows_ms(extra + sum of widths) + searches + the longest head chain's draft
                      (one batched call per chain step serves every row) + each tree's draft
                      + each drafting row's backlog (the positions its head has not read)

        (extra: prompt tokens prefilled in the same pass.)

        A row's extra draft tokens cost what they add to the batch's pass (nearly nothing on a
        small batch of a memory-bound model, a full row each once the pass is compute-bound), so
        speculation narrows as the batch grows and comes back as it shrinks. Coordinate ascent
        from no speculation: each row in turn takes its option that most improves the step, two
        rounds (the objective in O(1) per option: totals kept, a chain's draft is the max)."""
        if len(asks) == 1 and not extra:
            one = self.choose(*asks[0])
            self._step_ms = one.cost_ms
            return [one]
        c, B = self.costs, len(asks)
        rows = []
        for ask in asks:
            opts = []
            backlog = ask[3] if len(ask) > 3 else 1
            for o in self.options(*ask):
                width = 1 + o.length
                verify = c.tree_verify.get(width, c.verify_ms(width)) if o.source == TREE else c.verify_ms(width)
                feed = c.feed_ms(backlog) if o.source in (HEAD, TREE) else 0.0
                draft = max(0.0, o.cost_ms - self.search_ms - verify - feed)
                opts.append((o, width, draft if o.source == HEAD else 0.0, draft if o.source == TREE else 0.0, feed))
            rows.append(opts)
        picks = [opts[0] for opts in rows]  # options() lists no speculation first
        fixed = self.search_ms * B
        tokens = float(B)
        width = B + extra
        serial = 0.0  # each tree's draft and each drafting row's backlog (read in one call, in sum)
        for _ in range(2):
            changed = False
            for i, opts in enumerate(rows):
                o0, w0, h0, t0, f0 = picks[i]
                others_chain = max((p[2] for j, p in enumerate(picks) if j != i), default=0.0)
                base_tokens, base_width, base_serial = tokens - o0.expected, width - w0, serial - t0 - f0

                def rate(t):
                    o, w, h, tr, f = t
                    ms = c.rows_ms(base_width + w) + fixed + max(others_chain, h) + base_serial + tr + f
                    return (base_tokens + o.expected) / ms

                best = max(opts, key=rate)
                if best is not picks[i] and rate(best) > rate(picks[i]):
                    picks[i], changed = best, True
                    tokens, width = base_tokens + best[0].expected, base_width + best[1]
                    serial = base_serial + best[3] + best[4]
            if not changed:
                break
        self._step_ms = c.rows_ms(width) + fixed + max(p[2] for p in picks) + serial
        return [p[0] for p in picks]

    def observe_batch(self, choices: list[Choice], accepted: list[int], head_views: list, draft_s: float,
                      verify_s: float, learn: list[bool] | None = None, extra: int = 0) -> None:
        """A batched step's outcome: each row's acceptance (rows with learn False, seeded
        requests drafting in their own order, teach acceptance only), and the step's time, which
        mends the cost of a pass of that many rows."""
        if len(choices) == 1 and not extra:
            return self.observe(choices[0], accepted[0], draft_s, verify_s, head_views[0])
        for choice, a, view in zip(choices, accepted, head_views):
            self._learn(choice, a, view)
        self.passes += 1
        self.batched += 1
        width = extra + sum(1 + ch.length for ch in choices)
        ms = 1000 * verify_s
        f, c = self.refine, self.costs
        if f and width < len(c.verify):
            c.verify[width] = c.verify[width] * (1 - f) + ms * f
        elif f:
            c.wide[width] = c.rows_ms(width) * (1 - f) + ms * f
        self.predicted_tokens += sum(ch.expected for ch in choices)
        self.predicted_ms += getattr(self, "_step_ms", 0.0) or 1000 * (draft_s + verify_s)
        self.tokens += sum(a + 1 for a in accepted)
        self.ms += 1000 * (draft_s + verify_s)
        plain = (c.rows_ms(extra + len(choices)) + self.search_ms * len(choices)) / len(choices)
        self._earned(sum(a + 1 for a in accepted), 1000 * (draft_s + verify_s), plain)

    def _learn(self, choice: Choice, accepted: int, head_view) -> None:
        for tracker in self.sources.values():
            tracker.decay(self.decay)
        for s in self.trees.values():
            s[0] *= self.decay
            s[1] *= self.decay
        if choice.source == TREE:
            self.trees[choice.shape][0] += accepted
            self.trees[choice.shape][1] += 1.0
        elif choice.source not in (NONE, HEAD):
            self.sources[choice.source].observe(choice.length, accepted)
        if head_view is not None:
            self.sources[HEAD].observe(*head_view)
        self.counts[choice.label] = self.counts.get(choice.label, 0) + 1

    def observe(self, choice: Choice, accepted: int, draft_s: float, verify_s: float,
                head_view: tuple[int, int, int | None] | None = None) -> None:
        """head_view: for a pass the head drafted, what its chain did (positions judged,
        accepted, rank of the target's token at the first miss; a tree's: tide.tree.chain_view)."""
        self._learn(choice, accepted, head_view)
        self.passes += 1
        self._refine(choice, 1000 * draft_s, 1000 * verify_s)
        self.predicted_tokens += choice.expected
        self.predicted_ms += choice.cost_ms
        self.tokens += accepted + 1
        self.ms += 1000 * (draft_s + verify_s)
        self._earned(accepted + 1, 1000 * (draft_s + verify_s), self.costs.verify_ms(1) + self.search_ms)

    def _earned(self, tokens: int, ms: float, plain_ms: float) -> None:
        """A pass made `tokens` in `ms`; without drafts each token costs `plain_ms` (the cost
        model's pass of no speculation, mended by the passes that take it)."""
        g = self._gain
        g[0] = g[0] * self.decay + ms
        g[1] = g[1] * self.decay + tokens * plain_ms

    def gain(self) -> float | None:
        """What speculation earns now: the recent passes' tokens per ms over what passes without
        drafts would have made (1.0: nothing; the trainer may spend what is above it)."""
        ms, plain = self._gain
        return plain / ms if ms > 0 else None

    def _refine(self, choice: Choice, draft_ms: float, verify_ms: float) -> None:
        """Move the cost of what this pass did towards what it took: a cost measured at startup
        under a passing load (or wrong on this machine for any reason) is mended by the passes
        that use it. A width priced too high is not taken and keeps its price, which only costs
        speed that its neighbours' prices would have shown; priced too low, it is taken and mended."""
        c, f = self.costs, self.refine
        if not f:
            return
        if choice.source == TREE:
            w = choice.shape[2] + 1
            c.tree_verify[w] = c.tree_verify.get(w, c.verify_ms(w)) * (1 - f) + verify_ms * f
            drafted = max(0.0, draft_ms - self.search_ms - c.draft_call)
            c.tree_draft[choice.shape] = c.tree_draft[choice.shape] * (1 - f) + drafted * f
            return
        w = min(choice.length + 1, len(c.verify) - 1)
        c.verify[w] = c.verify[w] * (1 - f) + verify_ms * f
        if choice.source == HEAD:  # the draft's share beyond the search, as a scale of its calls
            scale = max(0.0, draft_ms - self.search_ms) / max(c.chain_draft_ms(choice.length), 1e-6)
            scale = 1 + f * (scale - 1)
            c.draft_call, c.draft_logits = c.draft_call * scale, c.draft_logits * scale
        else:  # no draft: the pass spent its draft time searching for copies
            self.search_ms = self.search_ms * (1 - f) + draft_ms * f

    def head_changed(self) -> None:
        """A new draft serves: what was learned of the old one's acceptance no longer holds."""
        self.sources[HEAD] = Acceptance(self.max_k)
        self.trees = {s: [0.0, 0.0] for s in self.shapes}

    def stats(self) -> dict:
        """Choices so far, acceptance per source and position, predicted and measured speedup
        (tokens per target step, the target alone's step as measured at startup)."""
        c = self.costs
        step = c.target_step

        def speedup(tokens, ms):
            return round(tokens * step / ms, 3) if ms else None

        return {
            "policy": "auto", "passes": self.passes, "batched_passes": self.batched, "choices": dict(self.counts),
            "acceptance": {name: [round(r, 3) for r in t.rates()[:4]] for name, t in self.sources.items()},
            "tree_accepted": {":".join(map(str, s)): round(self._tree_gain(s), 3) for s in self.shapes},
            "predicted_speedup": speedup(self.predicted_tokens, self.predicted_ms),
            "measured_speedup": speedup(self.tokens, self.ms),
            "gain": None if self.gain() is None else round(self.gain(), 3),
            "costs_ms": {"target_step": round(step, 2), "verify": [round(v, 2) for v in c.verify[1:]],
                         "draft_call": round(c.draft_call, 3), "draft_logits": round(c.draft_logits, 3)},
        }


WIDE = (24, 32, 48, 64, 96, 128)  # rows of the wider passes timed for batches


def policy_from_config(params: DecodeConfig, target: Target, head: DraftHead, max_context: int,
                       reps: int = 5, seed: int = 0, batch: int = 1):
    """The policy `decode.policy` names, its costs measured here on a 256-token text (auto); None
    for fixed (each request then follows its own parameters). batch > 1: a batch of up to that
    many requests decodes together, and wider passes are timed too."""
    from tide.config import tree_shapes

    if params.policy == "fixed":
        return None
    shapes = tree_shapes(params.trees)
    max_copy = max(params.lookup_k if params.lookup_ngram else 0, params.history_k, params.k)
    widest = 1 + max(max_copy, *(n for _, _, n in shapes))
    n = max(16, min(256, max_context // 2))
    context = torch.randint(0, target.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    costs = measure_costs(target, head, context.tolist(), widest, reps, shapes, wide=WIDE if batch > 1 else ())
    return AdaptivePolicy(costs, params.k, shapes, max_copy, seed=seed,
                          search_ms=costs.lookup if params.lookup_ngram else 0.0)
