"""Continuous batching with speculation: every running request advances in one target pass.

A decode step: each row (request) drafts what the speculation policy picks for it (a head chain
or tree, a lookup or history copy, or nothing), then one target forward verifies every row's
[y, draft...] at once under one attention mask with per-row positions, and each row accepts and
commits on its own (tide.speculative's rules, row by row). The KV caches are preallocated slots
(tide.kvslots): a row's rollback is its length, a tree's accepted path moves down in place.

    admit(request)  a new request prefills over the next steps, `prefill_chunk` prompt tokens
                    per step shared by the requests joining (in order), so a long prompt does not
                    stall the running rows; then it joins them
    step()          one pass: every running row's decode step and the joining rows' prefill
                    chunks packed together (chunked prefill, as vLLM's); returns the rows that
                    finished (stop, length, cancelled, failed)

Rows sit in slots 0..B-1 in order, the joining ones after the running ones (the step reads the
caches as one view); a row that leaves has the rows after it moved down. The head drafts batched
too: one call feeds every drafting row's verified positions, one call per chain step feeds each
row's newest draft token.

Lossless per row: every emitted token is the target's (greedy: its argmax after exactly the
row's own tokens; sampling: tide.rejection per row with the row's own generator), whatever the
other rows and the drafts are. Not thread-safe: one loop drives a decoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from tide.config import DecodeConfig
from tide.errors import TideError
from tide.kvslots import HeadSlots, SlotCache
from tide.lookup import AnswerHistory
from tide.models import Packed, Target, use_packed_attention
from tide.policy import HEAD, HISTORY, LOOKUP, NONE, RECALL, TOPS, TREE, Choice, FixedPolicy
from tide.rejection import accept_greedy, accept_sampling, target_probs
from tide.speculative import Generation, _check_room, _Emitter, _finish, _generator, draft_offers, sample_token
from tide.tree import DraftTree, accept_tree_greedy, chain_view, propose_tree

SLACK = 64  # cache positions past max_context: the widest verify pass or tree a row may add


class Cancelled(TideError):
    """The client went away; decoding stopped at the next step."""


@dataclass
class Request:
    prompt: list[int]
    params: DecodeConfig
    rid: str = ""
    on_tokens: object = None  # on_tokens(new ids) after each step; True ends it ("stop"); may raise
    capture: bool = False  # keep the features and final hidden states of every verified position
    cancelled: bool = False  # set from any thread: the row leaves at its next step


@dataclass
class Row:
    req: Request
    slot: int
    gen: torch.Generator | None
    g: Generation
    emit: _Emitter
    prefilled: int = 0  # prompt tokens in the cache while it joins
    length: int = 0  # L: tokens in the target cache
    y: int = -1  # the next token, known and not yet fed
    pending_f: list = field(default_factory=list)  # verified positions the head has not read
    pending_t: list = field(default_factory=list)
    sequence: list[int] = field(default_factory=list)
    captured: list = field(default_factory=list)
    reason: str | None = None  # why it finished
    error: BaseException | None = None  # it failed (Cancelled: its client is gone)
    started: float = 0.0

    @property
    def done(self) -> bool:
        return self.reason is not None or self.error is not None


@dataclass
class _Draft:
    choice: Choice
    tokens: torch.Tensor  # (n,) target ids
    probs: torch.Tensor | None = None  # (n, V) under sampling
    tree: DraftTree | None = None
    tops: list = field(default_factory=list)  # greedy head chains: the head's best ids per position
    path: list[int] = field(default_factory=list)  # a tree's accepted path
    z: int = -1  # the recovered or bonus token


class BatchDecoder:
    """target + head over `slots` preallocated rows. policy: tide.policy (AdaptivePolicy prices
    the whole batch; None: each row drafts in its own configured order). speculative=False: the
    target alone, batched (one token per row per step, no hidden states)."""

    def __init__(self, target: Target, head, slots: int, max_context: int, policy=None,
                 history: AnswerHistory | None = None, prefill_chunk: int = 256, speculative: bool = True):
        self.target, self.head, self.policy, self.history = target, head, policy, history
        self.max_context, self.prefill_chunk, self.speculative = max_context, max(1, prefill_chunk), speculative
        device = target.embed.weight.device
        use_packed_attention(target.model)
        capacity = max_context + SLACK
        self.cache = SlotCache.for_model(target.config, slots, capacity, target.dtype, device)
        self.heads = HeadSlots.for_head(head, slots, capacity) if speculative else None
        self.slots = slots
        self.running: list[Row] = []
        self.joining: list[Row] = []  # prefilling, in admission order, in the slots after the running rows
        self.device = device
        # a pass wider than the bf16 kernel takes (tide.kernels.kernel_rows) runs on torch's bf16, whose
        # rows depend on the pass: prefill chunks join a decode pass only while it stays this narrow
        self.mix_rows = min((m.bf16_rows for m in target.model.modules() if getattr(m, "bf16_on", False)),
                            default=1 << 30)
        self.steps = 0
        self.last_batch = 0
        self.rows_stepped = 0  # rows over all decode steps: their mean is the batch served

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + (self.heads.kv.nbytes if self.heads is not None else 0)

    def has_room(self) -> bool:
        return len(self.running) + len(self.joining) < self.slots

    def busy(self) -> bool:
        return bool(self.joining or self.running)

    def admit(self, req: Request) -> Row:
        """Start a request: it prefills over the next steps. Raises ContextTooLong."""
        if not self.has_room():
            raise RuntimeError("no free slot: admit only when has_room()")
        _check_room(self.target, len(req.prompt), self.max_context)
        k = req.params.k
        row = Row(req, len(self.running) + len(self.joining), _generator(req.params),
                  Generation(tokens=[], finish_reason="length", prompt_len=len(req.prompt), accepted_per_pos=[0] * k),
                  _Emitter(req.on_tokens), started=time.perf_counter())
        if self.heads is not None:
            self.heads.lengths[row.slot] = 0
        self.joining.append(row)
        return row

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One pass: the running rows' decode step and the joining rows' prefill chunks; the rows
        that finished (they left their slots)."""
        for row in (*self.joining, *self.running):
            if row.req.cancelled and not row.done:
                row.error = Cancelled(f"request {row.req.rid} was cancelled")
        finished = self._leave()
        if self.running or self.joining:
            self._decode(self.running)
        self._joined()
        return finished + self._leave()

    def _chunks(self, budget: int) -> list[tuple[Row, int, int]]:
        """(row, start, end): the prompt tokens each joining row prefills this step, in order,
        `budget` in all."""
        out = []
        for row in self.joining:
            if budget <= 0:
                break
            if row.done or row.prefilled >= len(row.req.prompt):
                continue
            end = min(len(row.req.prompt), row.prefilled + budget)
            out.append((row, row.prefilled, end))
            budget -= end - row.prefilled
        return out

    def _prefill_alone(self) -> None:
        """A step's prefill chunks in passes of their own (one per row), before the decode pass:
        where the decode pass alone is as wide as the kernel takes."""
        for row, start, end in self._chunks(self.prefill_chunk):
            try:
                self._prefill_chunk(row, start, end)
            except Exception as e:  # noqa: BLE001 - the row fails, the batch goes on
                row.error = e

    def _joined(self) -> None:
        """After a pass: rows whose prompt is in the cache join the running ones (a prefix of the
        joining rows that stay: the chunk budget goes in order). Rows that finished or failed at
        once stay for _leave."""
        ready = []
        for row in self.joining:
            if row.done:
                continue
            if row.prefilled < len(row.req.prompt):
                break
            ready.append(row)
        if ready:
            self.running += ready
            self.joining = [r for r in self.joining if r not in ready]

    def _leave(self) -> list[Row]:
        gone = [r for r in (*self.running, *self.joining) if r.done]
        if gone:
            self.running = [r for r in self.running if not r.done]
            self.joining = [r for r in self.joining if not r.done]
            self._compact()
        return gone

    def _compact(self) -> None:
        """Move the rows that stay into slots 0..len-1 in order, running then joining (lowest
        first: each target slot is free)."""
        for i, row in enumerate(self.running):
            if row.slot != i:
                self._move(row, i, row.length)
        for i, row in enumerate(self.joining, start=len(self.running)):
            if row.slot != i:
                self._move(row, i, row.prefilled)

    def _move(self, row: Row, slot: int, length: int) -> None:
        self.cache.move(row.slot, slot, length)
        if self.heads is not None:
            self.heads.move(row.slot, slot)
        row.slot = slot

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill_chunk(self, row: Row, start: int, end: int) -> None:
        prompt = row.req.prompt
        pos = torch.arange(start, end, device=self.device)[None]
        mask = (torch.arange(end, device=self.device)[None, :] <= pos[0][:, None])[None, None]  # (1,1,c,end)
        self.cache.plan([row.slot], [start], end - start, end)
        hidden = self.speculative or row.req.capture
        out = self.target.model(input_ids=torch.tensor([prompt[start:end]], device=self.device),
                                past_key_values=self.cache, use_cache=True, output_hidden_states=hidden,
                                position_ids=pos, attention_mask=mask, logits_to_keep=1)
        hs = out.hidden_states if hidden else None
        self._prefilled(row, end, out.logits[0, -1],
                        torch.cat([hs[i][0] for i in self.target.feature_layers], dim=-1) if hidden else None,
                        hs[-1][0] if hidden else None)

    def _prefilled(self, row: Row, end: int, last_logits, features, final) -> None:
        """A prefill chunk of `row` ran up to `end`: keep its features; at the prompt's end the
        row has its first token."""
        prompt, start = row.req.prompt, row.prefilled
        if features is not None and row.req.capture:
            row.captured.append((features, final))
        row.prefilled = end
        if features is not None and self.speculative:
            # the head reads the chunk now (its positions' next tokens are known) but the prompt's
            # last position, which predicts the first draft token, as the backlog of one
            nexts = prompt[start + 1 : end + 1]
            self._feed_prompt(row, start, features[: len(nexts)], nexts)
            if end == len(prompt):
                row.pending_f = [features[-1:]]
        if end < len(prompt):
            return
        y = sample_token(last_logits, row.req.params, row.gen)
        row.length, row.y = len(prompt), y
        row.pending_t = [y]
        row.sequence = [*prompt, y]
        row.g.prefill_s = time.perf_counter() - row.started
        self._finish_check(row)

    def _feed_prompt(self, row: Row, start: int, features: torch.Tensor, tokens: list[int]) -> None:
        """The head reads prompt positions start.. (their features, each next token) into its
        cache as they prefill: a row's first draft then reads one position, not the prompt."""
        n = len(tokens)
        if n == 0:
            return
        pos = torch.arange(start, start + n, device=self.device)[None]
        mask = (torch.arange(start + n, device=self.device)[None, None, :] <= pos[:, :, None])[:, None]
        ids = torch.tensor([tokens], device=self.device)
        self.head(self.head.fuse(features[None]), self.target.embed(ids), pos,
                  self.heads.batch([row.slot], [start], start + n), attn_mask=mask)
        self.heads.lengths[row.slot] = start + n

    # -- a decode step -----------------------------------------------------------------------------
    def _decode(self, rows: list[Row]) -> None:
        """One pass: the running rows draft and verify, and the joining rows' prefill chunks go
        in the same pass (chunked prefill), as many tokens as keep it as narrow as the kernel
        takes (self.mix_rows); where none fit, the chunks run first in passes of their own."""
        t0 = time.perf_counter()
        want = min(self.prefill_chunk, sum(len(r.req.prompt) - r.prefilled for r in self.joining))
        choices = self._choose(rows, want) if rows else []
        drafts = self._draft(rows, choices) if rows else []
        room = min(self.prefill_chunk, self.mix_rows - sum(1 + len(d.tokens) for d in drafts))
        t1 = time.perf_counter()
        if self.joining and room < 1:
            self._prefill_alone()
        chunks = self._chunks(room) if room >= 1 else []
        extra = sum(e - s for _, s, e in chunks)
        if not rows and not chunks:
            return
        t_pass = time.perf_counter()
        out, prefills = self._verify(rows, drafts, chunks)
        t2 = time.perf_counter()
        for (row, _, end), (last, f, fin) in zip(chunks, prefills):
            try:
                self._prefilled(row, end, last, f, fin)
            except Exception as e:  # noqa: BLE001 - the row fails, the batch goes on
                row.error = e
        if not rows:
            return
        accepted = []
        for row, d, o in zip(rows, drafts, out):
            try:
                accepted.append(self._accept(row, d, o))
            except Exception as e:  # noqa: BLE001 - one row's failure is its own
                row.error = e
                accepted.append(0)
        self.steps += 1
        self.last_batch = len(rows)
        self.rows_stepped += len(rows)
        if self.policy is not None and hasattr(self.policy, "observe_batch"):
            views = [self._head_view(d, a) for d, a in zip(drafts, accepted)]
            self.policy.observe_batch([d.choice for d in drafts], accepted, views, t1 - t0, t2 - t_pass,
                                      [r.req.params.seed is None for r in rows], extra)
        share = (t2 - t0) / len(rows)
        for row, d, a in zip(rows, drafts, accepted):
            if row.error is not None:
                continue
            row.g.draft_s += (t1 - t0) / len(rows)
            row.g.verify_s += share - (t1 - t0) / len(rows)
            self._count(row, d, a)
            self._finish_check(row)

    def _choose(self, rows: list[Row], extra: int = 0) -> list[Choice]:
        if not self.speculative:
            return [Choice(NONE)] * len(rows)
        asks, fixed = [], []
        for row in rows:
            p = row.req.params
            room = self.max_context - row.length - 1
            offers = draft_offers(row.sequence, p, self.history, room)
            asks.append((offers, room, p.temperature == 0, len(row.pending_t)))
            # a seeded request drafts in its configured order: under sampling the draft decides how
            # its random stream is spent, and the same seed must give the same text
            fixed.append(self.policy is None or p.seed is not None or not hasattr(self.policy, "choose_batch"))
        out: list[Choice | None] = [FixedPolicy(r.req.params).choose(*a) if f else None
                                    for r, a, f in zip(rows, asks, fixed)]
        free = [i for i, f in enumerate(fixed) if not f]
        if free:
            for i, c in zip(free, self.policy.choose_batch([asks[i] for i in free], extra)):
                out[i] = c
        self._offers = [a[0] for a in asks]
        return out

    def _draft(self, rows: list[Row], choices: list[Choice]) -> list[_Draft]:
        drafts = [None] * len(rows)
        head_rows = [i for i, c in enumerate(choices) if c.source in (HEAD, TREE)]
        lasts = self._feed([rows[i] for i in head_rows]) if head_rows else []
        chain = [(i, last) for i, last in zip(head_rows, lasts) if choices[i].source == HEAD]
        if chain:
            for (i, _), d in zip(chain, self._chains([rows[i] for i, _ in chain], [choices[i] for i, _ in chain],
                                                     [last for _, last in chain])):
                drafts[i] = d
        for i, last in zip(head_rows, lasts):
            if choices[i].source == TREE:
                row = rows[i]
                tree = propose_tree(self.head, self.target.embed, last[None], self.heads.row(row.slot), row.length,
                                    *choices[i].shape)
                drafts[i] = _Draft(choices[i], tree.tokens, tree=tree)
        vocab = self.head.config.target_vocab_size
        for i, c in enumerate(choices):
            if drafts[i] is None:  # a copy, or nothing: under sampling a copy's mass is all on its token
                tokens = torch.tensor(self._offers[i].get(c.source, [])[: c.length] if self.speculative else [],
                                      dtype=torch.long)
                greedy = rows[i].req.params.temperature == 0
                drafts[i] = _Draft(c, tokens, None if greedy else torch.nn.functional.one_hot(tokens, vocab).float())
        return drafts

    def _feed(self, rows: list[Row]) -> list[torch.Tensor]:
        """One head call over the verified positions each row's head has not read; returns each
        row's last output (1, H), which predicts its first draft token."""
        head, embed = self.head, self.target.embed
        m = [len(r.pending_t) for r in rows]
        M = max(m)
        width = self.head.fc.in_features
        feats = torch.zeros(len(rows), M, width, dtype=rows[0].pending_f[0].dtype, device=self.device)
        toks = torch.zeros(len(rows), M, dtype=torch.long, device=self.device)
        for j, r in enumerate(rows):
            f = torch.cat(r.pending_f) if len(r.pending_f) > 1 else r.pending_f[0]
            feats[j, : m[j]] = f
            toks[j, : m[j]] = torch.tensor(r.pending_t)
        starts = torch.tensor([r.length - n for r, n in zip(rows, m)], device=self.device)
        pos = starts[:, None] + torch.arange(M, device=self.device)
        length = int(pos.max()) + 1
        mask = (torch.arange(length, device=self.device)[None, None, :] <= pos[:, :, None])[:, None]
        out, _ = head(head.fuse(feats), embed(toks), pos,
                      self.heads.batch([r.slot for r in rows], starts.tolist(), length), attn_mask=mask)
        for r in rows:
            self.heads.lengths[r.slot] = r.length
            r.pending_f, r.pending_t = [], []
        return [out[j, m[j] - 1 : m[j]] for j in range(len(rows))]

    def _chains(self, rows: list[Row], choices: list[Choice], lasts: list[torch.Tensor]) -> list[_Draft]:
        """Each row's head chain of up to its chosen length, one batched head call per step."""
        head, embed = self.head, self.target.embed
        n = len(rows)
        tokens: list[list[int]] = [[] for _ in range(n)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        tops: list[list] = [[] for _ in range(n)]
        chain_p = [1.0] * n
        active = list(range(n))
        last = torch.stack(lasts)  # (n, 1, H)
        vocab = head.config.target_vocab_size
        for t in range(max(c.length for c in choices)):
            logits = head.logits(last)[:, -1].float()  # (len(active), Vd)
            best = logits.argmax(-1).tolist()
            top_ids = head.to_target_ids(logits.topk(TOPS, dim=-1).indices).tolist()
            go = []
            for j, i in enumerate(active):
                p = rows[i].req.params
                if p.temperature == 0:
                    tops[i].append(top_ids[j])
                    d = best[j]
                    if p.draft_threshold > 0:
                        chain_p[i] *= float(torch.softmax(logits[j], -1)[d])
                else:
                    q = torch.softmax(logits[j] / p.temperature, dim=-1)
                    d = int(torch.multinomial(q, 1, generator=rows[i].gen))
                    chain_p[i] *= float(q[d])
                if t > 0 and chain_p[i] < p.draft_threshold:
                    continue
                if p.temperature > 0:
                    probs[i].append(torch.zeros(vocab).index_copy_(0, head.target_ids, q))
                tokens[i].append(int(d + head.d2t[d]))
                if len(tokens[i]) < choices[i].length:
                    go.append((j, i))
            if not go:
                break
            keep = torch.tensor([j for j, _ in go])
            active = [i for _, i in go]
            pos = torch.tensor([[rows[i].length + t] for i in active], device=self.device)
            length = int(pos.max()) + 1
            mask = (torch.arange(length, device=self.device)[None, None, :] <= pos[:, :, None])[:, None]
            ids = torch.tensor([[tokens[i][-1]] for i in active], device=self.device)
            cache = self.heads.batch([rows[i].slot for i in active], pos[:, 0].tolist(), length)
            last, _ = head(last[keep], embed(ids), pos, cache, attn_mask=mask)
        out = []
        for i, c in enumerate(choices):
            if len(tokens[i]) < c.length:  # cut by decode.draft_threshold
                c = replace(c, length=len(tokens[i]))
            out.append(_Draft(c, torch.tensor(tokens[i], dtype=torch.long),
                              torch.stack(probs[i]) if probs[i] else None, tops=tops[i]))
        return out

    def _verify(self, rows: list[Row], drafts: list[_Draft], chunks: list) -> tuple[list, list]:
        """One packed target pass over every row's [y, draft...] (no row padded to the widest)
        and the prefill chunks; per row: its logits, and its features and final hidden states
        where they are kept; per chunk: its last position's logits, its features and finals."""
        widths = [1 + len(d.tokens) for d in drafts]
        sizes = [e - s for _, s, e in chunks]
        T = max([r.length + w for r, w in zip(rows, widths)] + [e for _, _, e in chunks])
        ids, depth, index, slot_of = [], [], [], []
        mask = torch.zeros(sum(widths) + sum(sizes), T, dtype=torch.bool)
        o = 0
        for row, d, w in zip(rows, drafts, widths):
            ids.append(torch.cat((torch.tensor([row.y]), d.tokens)))
            index.append(torch.arange(w))
            slot_of.append(torch.full((w,), row.slot, dtype=torch.int32))
            mask[o : o + w, : row.length] = True
            if d.tree is not None:
                depth.append(torch.cat((torch.zeros(1, dtype=torch.long), d.tree.depths)) + row.length)
                mask[o : o + w, row.length : row.length + w] = d.tree.visibility()
            else:
                depth.append(torch.arange(row.length, row.length + w))
                mask[o : o + w, row.length : row.length + w] = torch.ones(w, w, dtype=torch.bool).tril()
            o += w
        for (row, start, end), w in zip(chunks, sizes):
            ids.append(torch.tensor(row.req.prompt[start:end]))
            index.append(torch.arange(w))
            slot_of.append(torch.full((w,), row.slot, dtype=torch.int32))
            depth.append(torch.arange(start, end))
            mask[o : o + w, :start] = True
            mask[o : o + w, start:end] = torch.ones(w, w, dtype=torch.bool).tril()
            o += w
        everyone = [*rows, *(r for r, _, _ in chunks)]
        dev = self.device
        pack = Packed(torch.cat(slot_of).to(dev), torch.cat(index).to(dev), max(widths + sizes),
                      max(r.slot for r in everyone) + 1)
        self.cache.plan_packed([r.slot for r in everyone], [r.length for r in rows] + [s for _, s, _ in chunks],
                               widths + sizes, T)
        hidden = self.speculative or any(r.req.capture for r in everyone)
        # the LM head only where a token is chosen: every decode position, a chunk's last one
        ends = torch.tensor(sizes).cumsum(0) + sum(widths) - 1
        keep = torch.cat((torch.arange(sum(widths)), ends)).to(dev)
        out = self.target.model(input_ids=torch.cat(ids)[None].to(dev), past_key_values=self.cache, use_cache=True,
                                output_hidden_states=hidden, position_ids=torch.cat(depth)[None].to(dev),
                                attention_mask=mask[None, None].to(dev), tide_pack=pack,
                                logits_to_keep=keep if chunks else 0)
        features = final = None
        if hidden:
            hs = out.hidden_states
            features = torch.cat([hs[i][0] for i in self.target.feature_layers], dim=-1)  # (N, 3H)
            final = hs[-1][0]
        per_row, o = [], 0
        for w in widths:
            per_row.append((out.logits[0, o : o + w], None if features is None else features[o : o + w],
                            None if final is None else final[o : o + w]))
            o += w
        prefills = []
        for j, w in enumerate(sizes):
            prefills.append((out.logits[0, sum(widths) + j], None if features is None else features[o : o + w],
                             None if final is None else final[o : o + w]))
            o += w
        return per_row, prefills

    def _accept(self, row: Row, d: _Draft, out: tuple) -> int:
        lg, features, final = out
        p = row.req.params
        if d.tree is not None:
            path, z = accept_tree_greedy(d.tree, lg)
            d.path = path
            kept = [0, *(i + 1 for i in path)]
            acc = d.tree.tokens[path]
            if kept != list(range(len(kept))):
                self.cache.keep(row.slot, row.length, kept)
        else:
            if p.temperature == 0:
                a, z = accept_greedy(d.tokens, lg)
            else:
                probs = d.probs if d.probs is not None else torch.zeros(0, lg.shape[-1])
                a, z = accept_sampling(d.tokens, probs, target_probs(lg, p.temperature, p.top_p, p.top_k), row.gen)
            kept = list(range(a + 1))
            acc = d.tokens[:a]
        if self.heads is not None:
            self.heads.lengths[row.slot] = min(self.heads.lengths[row.slot], row.length)
        d.z = z
        new = [*acc.tolist(), z]
        if features is not None:
            f = features[kept]
            if self.speculative:
                row.pending_f.append(f)
                row.pending_t.extend(new)
            if row.req.capture:
                row.captured.append((f, final[kept]))
        row.length += len(kept)
        row.y = z
        row.sequence.extend(new)
        return len(kept) - 1

    @staticmethod
    def _head_view(d: _Draft, a: int):
        """What the head's chain did in this pass, for the policy (None: the head did not draft)."""
        if d.tree is not None:
            return chain_view(d.tree, d.path)
        if d.choice.source != HEAD:
            return None
        miss = d.tops[a] if a < len(d.tops) else ()
        return len(d.tokens), a, (miss.index(d.z) if d.z in miss else None)

    @staticmethod
    def _count(row: Row, d: _Draft, a: int) -> None:
        g, source = row.g, d.choice.source
        if source in (RECALL, HISTORY):
            g.history_passes += 1
            g.history_accepted += a
        elif source == LOOKUP:
            g.lookup_passes += 1
            g.lookup_accepted += a
        elif source == NONE:
            g.plain_passes += 1
        g.passes += 1
        g.drafted += len(d.tokens)
        g.accepted += a
        for i in range(min(a, len(g.accepted_per_pos))):
            g.accepted_per_pos[i] += 1

    def _finish_check(self, row: Row) -> None:
        p = row.req.params
        new, reason = _finish(row.sequence[len(row.req.prompt):], self.target.eos_ids, p.max_new_tokens)
        if reason is None and self.max_context - row.length - 1 < 1:
            reason = "length"
        try:
            if row.emit(new):
                reason = "stop"
        except Exception as e:  # noqa: BLE001 - the callback's failure (Cancelled) ends this row only
            row.error = e
            return
        if reason is not None:
            row.reason = reason
            row.g.tokens, row.g.finish_reason = new, reason
            if row.req.capture and row.captured:
                row.g.sequence = row.sequence
                row.g.features = torch.cat([f for f, _ in row.captured])
                row.g.final_hidden = torch.cat([h for _, h in row.captured])
