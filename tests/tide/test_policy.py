"""The speculation controller (tide.policy): what it picks for drafts that never or always hit,
how it prices trees and copies, and that its cost model predicts what passes cost here."""

from dataclasses import replace

import pytest
import torch

from tests.tide.test_speculative import _good_head, _noisy_head
from tide.config import DecodeConfig
from tide.policy import HEAD, LOOKUP, NONE, TREE, Acceptance, AdaptivePolicy, Costs, policy_from_config
from tide.speculative import speculative_generate, target_generate

SHAPES = [(1, 2, 2), (1, 4, 4), (3, 4, 8)]


def _costs(step=30.0, per_row=1.0):
    """A CPU-like machine: a pass of w rows costs step + per_row * (w - 1); a draft call 1 ms."""
    return Costs(target_step=step, verify=[0.0] + [step + per_row * (w - 1) for w in range(1, 18)],
                 draft_call=1.0, draft_logits=0.5, tree_draft={s: 1.5 * s[0] for s in SHAPES})


def _run(policy, passes, accepted_of, offers=None, view_of=None):
    """view_of(choice, accepted): the head's view of a pass it drafted (default: a chain's)."""
    picked = []
    for _ in range(passes):
        choice = policy.choose(offers or {}, room=1000, tree_ok=True)
        a = accepted_of(choice)
        view = view_of(choice, a) if view_of else (choice.length, a, None) if choice.source == HEAD else None
        policy.observe(choice, a, 0.0, 0.0, view)
        picked.append(choice)
    return picked


def test_a_draft_that_never_hits_gets_no_speculation():
    policy = AdaptivePolicy(_costs(), max_k=5, shapes=SHAPES, refine=0.0)
    picked = _run(policy, 600, lambda c: 0, view_of=lambda c, a: (c.shape[0] if c.shape else c.length, 0, None)
                  if c.source in (HEAD, TREE) else None)
    late = picked[100:]
    assert [c.source for c in late].count(NONE) >= 0.9 * len(late)  # the odd pass re-checks the draft
    assert sum(c.cost_ms for c in late) < 1.02 * len(late) * _costs().verify[1]  # which costs < 2%
    assert policy.stats()["acceptance"]["head"][0] < 0.1


def test_a_draft_that_always_hits_is_used_to_full_length():
    policy = AdaptivePolicy(_costs(), max_k=5, shapes=SHAPES, refine=0.0)
    picked = _run(policy, 300, lambda c: c.shape[0] if c.source == TREE else c.length,
                  view_of=lambda c, a: (a, a, None) if c.source in (HEAD, TREE) else None)
    assert all(c.label == "head:5" for c in picked[-100:])
    assert policy.stats()["acceptance"]["head"][:4] == pytest.approx([1.0] * 4, abs=0.02)


def test_a_backlog_the_head_must_read_first_is_priced_over_the_passes_it_serves():
    """A head that always hits drafts with a backlog of a few positions, not of thousands (read
    first, they cost more than its chain gains, even charged over BACKLOG_PASSES passes); a
    batched step drafts for the rows without one."""
    policy = AdaptivePolicy(replace(_costs(), feed_pos=1.0), max_k=5, refine=0.0)
    _run(policy, 100, lambda c: c.length, view_of=lambda c, a: (a, a, None) if c.source == HEAD else None)
    assert policy.choose({}, 1000, False, backlog=1).label == "head:5"
    assert policy.choose({}, 1000, False, backlog=9).source == HEAD
    assert policy.choose({}, 1000, False, backlog=5000).source == NONE
    both = policy.choose_batch([({}, 1000, False, 1), ({}, 1000, False, 5000)])
    assert both[0].source == HEAD and both[1].source == NONE


def test_a_copy_is_taken_where_it_pays_and_cut_where_its_tail_misses():
    """Prompt lookup's copies cost no draft: one whose first three tokens hit and the rest miss
    is cut to three, and taken over a head that never hits."""
    policy = AdaptivePolicy(_costs(per_row=3.0), max_k=5, shapes=SHAPES, refine=0.0)
    offers = {LOOKUP: list(range(12))}
    picked = _run(policy, 400, lambda c: min(c.length, 3) if c.source == LOOKUP else 0, offers)
    late = [c.label for c in picked[-100:]]
    assert late.count("lookup:3") >= 90, late


def test_trees_are_priced_from_where_the_target_token_stood_in_the_head_s_chain_passes():
    """Chain passes that miss with the target's token second in the head's list make a
    one-level tree of two look good before one was ever drafted."""
    acc = Acceptance(4)
    for _ in range(50):
        acc.observe(4, 0, miss_rank=1)
    assert acc.rates(1)[0] < 0.05 and acc.rates(2)[0] > 0.95
    policy = AdaptivePolicy(_costs(per_row=0.5), max_k=5, shapes=SHAPES, refine=0.0)
    policy.sources[HEAD] = acc
    assert policy.choose({}, 1000, False).source == NONE  # sampling: no trees
    # a tree of any shape takes the second-best token and misses below it: the cheapest wins
    picked = _run(policy, 200, lambda c: 1 if c.source == TREE else 0,
                  view_of=lambda c, a: (min(2, c.shape[0]), 0, 1) if c.source == TREE else (c.length, 0, 1))
    assert [c.label for c in picked[-50:]].count("tree:1:2:2") >= 45


def test_a_pass_priced_too_low_at_startup_is_mended_by_the_passes_that_take_it():
    """Startup measured a 2-row pass at 10 ms (a noisy moment); it takes 36 ms. A draft that
    hits 10% of the time pays at 10 ms, not at 36: the passes taken mend the price and the
    policy stops drafting."""
    costs = _costs()
    costs.verify[2] = 10.0
    policy = AdaptivePolicy(costs, max_k=5, shapes=[])
    picked = []
    for i in range(300):
        c = policy.choose({}, 1000, False)
        hit = int(c.source == HEAD and i % 10 == 0)
        verify_ms = 30.0 + 6.0 * c.length
        policy.observe(c, hit, 0.0015 * c.length, verify_ms / 1000, (c.length, hit, None) if c.source == HEAD else None)
        picked.append(c.source)
    assert picked[0] == HEAD and picked[-100:].count(NONE) >= 90
    assert costs.verify[2] == pytest.approx(36.0, rel=0.05)


@pytest.mark.parametrize("make_head, expect", [(_noisy_head, NONE), (_good_head, HEAD)])
def test_decode_with_the_policy_stays_exact_and_follows_the_draft(tiny, make_head, expect):
    head = make_head(tiny)
    params = DecodeConfig(k=4, max_new_tokens=48)
    policy = AdaptivePolicy(_costs(), max_k=4, shapes=SHAPES, refine=0.0)
    for seed in range(6):
        prompt = torch.randint(1, 90, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        spec = speculative_generate(tiny, head, prompt, params, policy=policy)
        assert spec.tokens == target_generate(tiny, prompt, params).tokens
    choices = policy.stats()["choices"]
    top = max(choices, key=choices.get)
    assert top.split(":")[0] == expect, choices


@pytest.mark.slow
def test_the_cost_model_predicts_what_passes_cost_here(smol_fp32):
    """Costs measured at startup, then a real decode: the policy's predicted cost of the passes
    it chose is within 15% of what they took (summed over every pass of three answers)."""
    from tide.checkpoint import new_head
    from tide.prompts import chat_ids

    torch.set_num_threads(1)
    try:
        head = new_head(smol_fp32, 8192)
        params = DecodeConfig(max_new_tokens=64, lookup_ngram=3, lookup_k=16)
        policy = policy_from_config(params, smol_fp32, head, 2048)
        texts = ("Name a colour.", "Write a haiku about the sea.", "List three prime numbers.", "What is 12 times 7?")
        for i, text in enumerate(texts):
            ids = chat_ids(smol_fp32.tokenizer, [{"role": "user", "content": text}])
            speculative_generate(smol_fp32, head, ids, params, policy=policy)
            if i == 0:  # the first answer warms up what a replica's first request warms up: not counted
                policy.passes, policy.ms, policy.predicted_ms = 0, 0.0, 0.0
    finally:
        torch.set_num_threads(2)
    assert policy.passes > 50
    assert policy.ms == pytest.approx(policy.predicted_ms, rel=0.15), policy.stats()
