"""Draft trees (EAGLE-2, arXiv:2406.16858) for greedy decoding: the draft proposes several
continuations at once and the target checks them all in one pass.

A chain of k draft tokens dies at its first miss. A tree keeps the draft's top-`topk` tokens at
each step: every step expands the `topk` best nodes so far (by the draft's joint probability of
the path), and the `n_nodes` best of all candidates are verified together. The target reads
them as one input with a tree attention mask (each node sees the prefix, the root and its own
ancestors) and position ids by depth; the longest path the target agrees with is accepted, plus
its bonus token. Where checking 16 tokens costs about what checking 4 does (bf16 on CPUs with
bf16 units, GPUs), more tokens are accepted per pass for the same cost.

Greedy only: each accepted token is the target's argmax after exactly the accepted path, so the
output is the target's own (lossless as the chain is). Sampling keeps the chain and its
rejection rule.

    verify input   [y, n_1, ..., n_N]   n_i at position L + depth(n_i); parents before children
    after the pass the target cache keeps the prefix, y and the accepted path (gathered in place)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from tide.draft_head import DraftHead
from tide.rejection import greedy_ids


@dataclass
class DraftTree:
    tokens: torch.Tensor  # (N,) target ids
    parents: torch.Tensor  # (N,) index of the parent node; -1: the root (the next token y)
    depths: torch.Tensor  # (N,) 1 for the root's children

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def visibility(self) -> torch.Tensor:
        """(N + 1, N + 1) bool over [root, nodes]: row i sees the root, its ancestors and itself."""
        n = len(self)
        vis = torch.eye(n + 1, dtype=torch.bool)
        vis[:, 0] = True
        for i, p in enumerate(self.parents.tolist()):  # parents come first: their rows are done
            if p >= 0:
                vis[i + 1] |= vis[p + 1]
        return vis


def propose_tree(head: DraftHead, embed, hidden: torch.Tensor, cache, length: int, depth: int,
                 topk: int, n_nodes: int) -> DraftTree:
    """hidden: (1, 1, H), the draft's output that predicts the first draft token; the draft cache
    holds `length` context entries. Tree nodes are appended to the cache (the caller crops them).
    """
    logp = torch.log_softmax(head.logits(hidden)[0, -1].float(), -1)
    scores, ids = logp.topk(topk)
    # every candidate: draft id, joint log-probability, parent candidate (-1: root), depth
    cand_ids, cand_scores = [ids], [scores]
    cand_parents, cand_depths = [torch.full((topk,), -1)], [torch.ones(topk, dtype=torch.long)]
    frontier = torch.arange(topk)  # candidates fed at this step
    frontier_hidden = hidden.expand(1, topk, -1)  # each one's parent's output
    fed: list[int] = []  # candidate of each tree entry in the draft cache, in order
    seen_by: dict[int, set[int]] = {-1: set()}  # candidate -> fed candidates it may attend to
    for d in range(1, depth):
        all_scores = torch.cat(cand_scores)
        all_parents = torch.cat(cand_parents).tolist()
        front = frontier.tolist()
        for c in front:
            seen_by[c] = seen_by[all_parents[c]] | {c}
        fed += front
        mask = torch.ones(len(front), length + len(fed), dtype=torch.bool)
        mask[:, length:] = torch.tensor([[f in seen_by[c] for f in fed] for c in front])
        tokens = head.to_target_ids(torch.cat(cand_ids)[frontier])
        out, _ = head(frontier_hidden, embed(tokens[None]), torch.full((len(front),), length + d - 1),
                      cache, attn_mask=mask)
        logp = torch.log_softmax(head.logits(out)[0].float(), -1)  # (T, Vd)
        scores, ids = logp.topk(topk, -1)  # (T, topk)
        joint = (all_scores[frontier][:, None] + scores).flatten()
        base = all_scores.shape[0]
        cand_ids.append(ids.flatten())
        cand_scores.append(joint)
        cand_parents.append(frontier.repeat_interleave(topk))
        cand_depths.append(torch.full((joint.shape[0],), d + 1))
        best = joint.topk(min(topk, joint.shape[0])).indices
        frontier, frontier_hidden = base + best, out[:, best // topk]
    return _select(head, torch.cat(cand_ids), torch.cat(cand_scores), torch.cat(cand_parents),
                   torch.cat(cand_depths), n_nodes)


def _select(head, ids, scores, parents, depths, n_nodes: int) -> DraftTree:
    """The n_nodes best candidates by joint probability, closed under ancestors (a child never
    scores above its parent, but ties could break the order), parents listed before children."""
    score, parent, depth = scores.tolist(), parents.tolist(), depths.tolist()
    chosen = {-1}  # the root, then the nodes taken
    for c in sorted(range(len(score)), key=lambda i: (-score[i], depth[i])):
        if len(chosen) > n_nodes:
            break
        if parent[c] in chosen:
            chosen.add(c)
    keep = sorted((c for c in chosen if c >= 0), key=lambda c: (depth[c], -score[c]))
    index = {c: i for i, c in enumerate(keep)}
    index[-1] = -1
    keep_t = torch.tensor(keep, dtype=torch.long)
    return DraftTree(tokens=head.to_target_ids(ids[keep_t]),
                     parents=torch.tensor([index[parent[c]] for c in keep], dtype=torch.long),
                     depths=depths[keep_t])


def tree_attention_mask(tree: DraftTree, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, N + 1, length + N + 1) additive mask for the verify pass over [y, nodes]."""
    n = len(tree)
    allowed = torch.ones(n + 1, length + n + 1, dtype=torch.bool)
    allowed[:, length:] = tree.visibility()
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def verify_inputs(tree: DraftTree, y: int, length: int, dtype: torch.dtype):
    """The verify pass over [y, nodes] after `length` cached tokens: input ids (1, N+1), position
    ids by depth and the tree attention mask."""
    ids = torch.cat((torch.tensor([y]), tree.tokens))[None]
    positions = (length + torch.cat((torch.zeros(1, dtype=torch.long), tree.depths)))[None]
    return ids, positions, tree_attention_mask(tree, length, dtype)


def follow(tree: DraftTree, next_token) -> list[int]:
    """The longest path (node indices, root's child first) whose every node is the token
    `next_token(node, depth)` says comes after its parent (node -1: the root y, depth 0)."""
    children: dict[int, dict[int, int]] = {}
    for i, (p, t) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        children.setdefault(p, {}).setdefault(t, i)
    path, node = [], -1
    while (nxt := children.get(node, {}).get(next_token(node, len(path)))) is not None:
        path.append(nxt)
        node = nxt
    return path


def sibling_ranks(tree: DraftTree, path: list[int]) -> list[int]:
    """Each path node's rank among its siblings, 0 for its parent's likeliest child (a tree lists
    siblings best first: parents before children, then by joint probability)."""
    parents = tree.parents.tolist()
    return [parents[:node].count(parents[node]) for node in path]


def chain_view(tree: DraftTree, path: list[int]) -> tuple[int, int, int | None]:
    """What the draft's chain (its likeliest child at every depth) would have done in this pass:
    (positions judged, accepted, where the target's token stood among the siblings at the first
    miss, None where the tree did not hold it)."""
    ranks = sibling_ranks(tree, path)
    accepted = next((i for i, r in enumerate(ranks) if r), len(ranks))
    depth = int(tree.depths.max()) if len(tree) else 0
    miss = ranks[accepted] if accepted < len(ranks) else None
    return min(accepted + 1, depth), accepted, miss


def accept_tree_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """logits: (N + 1, V) for [root, nodes]. Returns the accepted path (node indices, root's
    child first) and the token that follows it (the target's argmax after the path)."""
    best = greedy_ids(logits).tolist()
    path = follow(tree, lambda node, depth: best[node + 1])
    return path, best[path[-1] + 1 if path else 0]


def keep_cache_rows(cache, length: int, rows: list[int]) -> None:
    """Keep the target cache's first `length` entries and then the entries of `rows` (indices
    into what the verify pass appended), in order: the accepted path replaces the tree."""
    drop = cache.get_seq_length() - length - len(rows)
    if rows == list(range(len(rows))):  # a chain, or a tree's first branch: a plain crop
        if drop > 0:
            cache.crop(-drop)  # transformers 5 crops by a negative count of tokens to drop
        return
    idx = torch.tensor(rows, dtype=torch.long) + length
    end = length + len(rows)
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:  # a sliding window keeps no full row index
            raise TypeError(f"draft trees need full-attention KV caches, not {type(layer).__name__}")
        # the kept rows move down in place (the gather copies them first), then the rest is cut:
        # copying the whole cache instead cost 0.7 ms a pass at 300 tokens of context
        layer.keys[..., length:end, :] = layer.keys[..., idx, :]
        layer.values[..., length:end, :] = layer.values[..., idx, :]
        layer.keys, layer.values = layer.keys[..., :end, :], layer.values[..., :end, :]
