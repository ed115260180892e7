"""Draft trees (greedy): exact output, the tree's shape, masks, acceptance and KV rollback."""

import copy

import pytest
import torch
from transformers import DynamicCache

from tests.tide.test_speculative import _good_head, _noisy_head
from tide.config import DecodeConfig
from tide.speculative import (
    feed_pending,
    propose,
    speculative_generate,
    start,
    target_forward,
    target_generate,
    verify_tree,
)
from tide.tree import DraftTree, accept_tree_greedy, keep_cache_rows, propose_tree


@pytest.mark.parametrize("k, topk, nodes", [(1, 3, 3), (3, 2, 6), (5, 4, 40)])
def test_tree_greedy_matches_target_alone(tiny, k, topk, nodes):
    params = DecodeConfig(k=k, tree_topk=topk, tree_tokens=nodes, max_new_tokens=40)
    for head in (_noisy_head(tiny), _good_head(tiny)):
        for seed in range(2):
            prompt = torch.randint(1, 90, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
            base = target_generate(tiny, prompt, params)
            spec = speculative_generate(tiny, head, prompt, params)
            assert spec.tokens == base.tokens and spec.finish_reason == base.finish_reason
            assert spec.drafted <= nodes * spec.passes


def test_a_tree_accepts_at_least_what_its_chain_does(tiny):
    head = _noisy_head(tiny, vocab=96, scale=0.05)  # agrees with the target now and then
    prompt = [3, 14, 15, 92, 65]
    chain = speculative_generate(tiny, head, prompt, DecodeConfig(k=4, max_new_tokens=60))
    tree = speculative_generate(tiny, head, prompt, DecodeConfig(k=4, tree_topk=4, tree_tokens=30, max_new_tokens=60))
    assert tree.tokens == chain.tokens
    assert tree.mean_accept_len > chain.mean_accept_len


def test_sampling_keeps_the_chain(tiny):
    params = DecodeConfig(k=3, tree_topk=4, tree_tokens=16, temperature=0.8, seed=0, max_new_tokens=30)
    g = speculative_generate(tiny, _good_head(tiny), [1, 2, 3], params)
    assert g.drafted == 3 * g.passes  # k per pass: no tree under the rejection-sampling rule


def test_tree_shape_and_every_node_is_the_drafts_top_k(tiny):
    """Parents come first, depth = parent's + 1, and each expanded node's children are the
    draft's own top-k after that node's path: computed here by feeding the path as a chain."""
    head = _noisy_head(tiny, scale=0.2)
    s = start(tiny, [5, 6, 7, 8, 9, 10], DecodeConfig(), None)
    with torch.inference_mode():
        hidden = feed_pending(head, tiny.embed, s)
        context = copy.deepcopy(s.draft_cache)
        tree = propose_tree(head, tiny.embed, hidden, s.draft_cache, s.length, depth=3, topk=3, n_nodes=1000)
        parents, depths = tree.parents.tolist(), tree.depths.tolist()
        assert len(tree) == 3 + 2 * 9  # all candidates: 3 root children, then 3 x 3 per further step
        for i, p in enumerate(parents):
            assert p < i and depths[i] == (1 if p < 0 else depths[p] + 1)
        children: dict[int, set[int]] = {}
        for i, p in enumerate(parents):
            children.setdefault(p, set()).add(tree.tokens[i].item())
        for node, kids in children.items():
            path = []
            while node >= 0:
                path.insert(0, tree.tokens[node].item())
                node = parents[node]
            cache, h = copy.deepcopy(context), hidden
            for j, t in enumerate(path):
                h, _ = head(h, tiny.embed(torch.tensor([[t]])), torch.tensor([s.length + j]), cache)
            top = head.to_target_ids(head.logits(h)[0, -1].topk(3).indices)
            assert kids == set(top.tolist())


def test_a_topk_1_tree_is_the_chain(tiny):
    head = _noisy_head(tiny, scale=0.2)
    s = start(tiny, [5, 6, 7, 8], DecodeConfig(), None)
    with torch.inference_mode():
        chain, _ = propose(head, tiny.embed, copy.deepcopy(s), DecodeConfig(), 4, None)
        tree = propose_tree(head, tiny.embed, feed_pending(head, tiny.embed, s), s.draft_cache, s.length, 4, 1, 4)
    assert tree.tokens.tolist() == chain.tolist() and tree.parents.tolist() == [-1, 0, 1, 2]


def test_accept_walks_the_branch_the_target_agrees_with():
    #        root -> 7 (0) -> 8 (2)
    #             -> 9 (1) -> 4 (3) -> 5 (4)
    tree = DraftTree(torch.tensor([7, 9, 8, 4, 5]), torch.tensor([-1, -1, 0, 1, 3]), torch.tensor([1, 1, 2, 2, 3]))
    vis = tree.visibility()
    assert vis[5].tolist() == [True, False, True, False, True, True]  # node 4 sees root, 9, 4 and itself
    logits = torch.zeros(6, 12)
    for row, best in enumerate([9, 1, 4, 1, 5, 11]):  # rows: root, then nodes 0..4
        logits[row, best] = 1.0
    assert accept_tree_greedy(tree, logits) == ([1, 3, 4], 11)
    logits[0].zero_()
    logits[0, 3] = 1.0  # the target's first token is no child of the root
    assert accept_tree_greedy(tree, logits) == ([], 3)


def test_rollback_keeps_the_accepted_branch_like_a_linear_pass(tiny):
    """After verifying a tree and keeping one side branch, the cache equals the cache of the
    prefix plus that branch fed in order."""
    prompt = [11, 12, 13, 14, 15]
    s = start(tiny, prompt, DecodeConfig(), None)
    tree = DraftTree(torch.tensor([20, 21, 22, 23]), torch.tensor([-1, -1, 1, 2]), torch.tensor([1, 1, 2, 3]))
    with torch.inference_mode():
        out = verify_tree(tiny, s, tree)
        keep_cache_rows(s.target_cache, s.length, [0, 2, 3, 4])  # y, then nodes 1, 2, 3
        ref = DynamicCache(config=tiny.config)
        ref_out = target_forward(tiny, torch.tensor([[*prompt, s.next_token, 21, 22, 23]]), ref)
    assert s.target_cache.get_seq_length() == ref.get_seq_length() == len(prompt) + 4
    for a, b in zip(s.target_cache.layers, ref.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    # the tree pass's logits on the branch are what a linear pass computes
    torch.testing.assert_close(out.logits[[0, 2, 3, 4]], ref_out.logits[len(prompt) :], atol=1e-4, rtol=1e-4)


def test_capture_from_a_tree_is_the_accepted_path(tiny):
    """The training signal of a tree pass: the features of the accepted branch only, as a plain
    forward pass over the final sequence computes them."""
    params = DecodeConfig(k=4, tree_topk=4, tree_tokens=30, max_new_tokens=40)
    prompt = [3, 14, 15, 92, 65]
    g = speculative_generate(tiny, _noisy_head(tiny, vocab=96, scale=0.05), prompt, params, capture=True)
    assert g.accepted > 0
    assert len(g.sequence) == g.features.shape[0] + 1 == g.final_hidden.shape[0] + 1
    assert g.sequence[len(prompt) : len(prompt) + len(g.tokens)] == g.tokens
    with torch.inference_mode():
        fresh = target_forward(tiny, torch.tensor([g.sequence[:-1]]), None)
    torch.testing.assert_close(g.features, fresh.features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g.final_hidden, fresh.final_hidden, atol=1e-4, rtol=1e-4)
