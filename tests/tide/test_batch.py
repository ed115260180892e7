"""Continuous batching (tide.batch): each request's output is the target alone's whatever joins,
leaves or is cancelled around it; per-row rollback; chunked prefill; sampling inside a batch."""

from dataclasses import replace

import pytest
import torch

from tests.conftest import tiny_target
from tests.tide.test_policy import SHAPES, _costs
from tests.tide.test_speculative import _exact_marginals, _good_head, _noisy_head
from tide.batch import BatchDecoder, Cancelled, Request
from tide.config import DecodeConfig
from tide.policy import HEAD, AdaptivePolicy
from tide.speculative import target_forward, target_generate


def _prompts(n, seed=0, lo=3, hi=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 90, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _serve(dec, reqs, join_every=2, on_step=None):
    """Admit a request every `join_every` steps while a slot is free; run until all finish."""
    queue, done, steps = list(reqs), {}, 0
    while queue or dec.busy():
        if queue and dec.has_room() and steps % join_every == 0:
            dec.admit(queue.pop(0))
        for row in dec.step():
            done[row.req.rid] = row
        steps += 1
        if on_step is not None:
            on_step(dec, steps)
    return done


CONFIGS = {
    "chain": DecodeConfig(k=3, lookup_ngram=0),
    "chain+lookup": DecodeConfig(k=4),
    "tree": DecodeConfig(k=3, tree_topk=3, tree_tokens=6, lookup_ngram=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_staggered_requests_match_the_target_alone(tiny, name):
    """12 requests of different prompt and output lengths through 4 slots, joining every other
    step, long prompts prefilled 5 tokens a step: each one's tokens are the target alone's."""
    for head in (_noisy_head(tiny), _good_head(tiny)):
        prompts = _prompts(12)
        reqs = [Request(p, replace(CONFIGS[name], max_new_tokens=8 + 3 * i), rid=str(i)) for i, p in enumerate(prompts)]
        dec = BatchDecoder(tiny, head, slots=4, max_context=256, prefill_chunk=5)
        done = _serve(dec, reqs)
        assert dec.steps > 0 and not dec.busy()
        for r in reqs:
            row = done[r.rid]
            assert row.error is None
            base = target_generate(tiny, r.prompt, r.params, max_context=256)
            assert row.g.tokens == base.tokens, (name, r.rid)
            assert row.g.finish_reason == base.finish_reason
    assert sum(done[r.rid].g.accepted for r in reqs) > 0  # the good head (the last) drafted and hit


def test_the_adaptive_policy_prices_the_batch_and_stays_exact(tiny):
    """The controller picks per row for the whole step (choose_batch); whatever it picks, the
    rows' outputs are the target's; a head that agrees is used inside the batch."""
    head = _good_head(tiny)
    policy = AdaptivePolicy(_costs(step=30.0, per_row=0.2), max_k=4, shapes=SHAPES)
    reqs = [Request(p, DecodeConfig(k=4, max_new_tokens=30), rid=str(i)) for i, p in enumerate(_prompts(8, seed=1))]
    done = _serve(BatchDecoder(tiny, head, slots=8, max_context=256, policy=policy), reqs, join_every=1)
    for r in reqs:
        assert done[r.rid].g.tokens == target_generate(tiny, r.prompt, r.params, max_context=256).tokens
    stats = policy.stats()
    assert stats["batched_passes"] > 0
    assert any(label.startswith(("head", "tree")) for label in stats["choices"]), stats["choices"]


def test_speculation_narrows_as_the_batch_grows():
    """Where a pass of more rows costs a full row each (compute-bound), drafting that pays for
    one request does not pay for sixteen; it comes back when the batch is small again."""
    policy = AdaptivePolicy(_costs(step=30.0, per_row=0.05), max_k=4)
    policy.costs.wide = {64: 30.0 + 63 * 6.0}  # past 17 rows every row costs 6 ms
    for _ in range(50):  # a head that agrees 60% of the time
        policy.observe(policy.choose({}, 1000, False), 1, 0.0, 0.0, (2, 1, None))
    one = policy.choose_batch([({}, 1000, False)])
    many = policy.choose_batch([({}, 1000, False)] * 16)
    assert one[0].source == HEAD and one[0].length >= 2
    assert sum(c.length for c in many) < 16 * one[0].length / 2
    assert policy.choose_batch([({}, 1000, False)])[0].length == one[0].length


def test_each_row_rolls_back_to_exactly_its_verified_prefix(tiny):
    """After steps with rejections, every row's cache slot holds the keys a fresh forward over
    its own tokens gives (and nothing of its rejected drafts), whatever its neighbours did."""
    from transformers import DynamicCache

    head = _noisy_head(tiny)
    dec = BatchDecoder(tiny, head, slots=3, max_context=256, prefill_chunk=4)
    for i, p in enumerate(_prompts(3, seed=2)):
        dec.admit(Request(p, DecodeConfig(k=4, max_new_tokens=200, lookup_ngram=0), rid=str(i)))
        while dec.joining:
            dec.step()
    for _ in range(6):
        dec.step()
    assert len(dec.running) == 3
    for row in dec.running:
        cache = DynamicCache(config=tiny.config)
        with torch.inference_mode():
            target_forward(tiny, torch.tensor([row.sequence[: row.length]]), cache, hidden=False)
        for layer, kv in zip(cache.layers, dec.cache.kv):
            torch.testing.assert_close(kv.k[row.slot, :, : row.length], layer.keys[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(kv.v[row.slot, :, : row.length], layer.values[0], atol=1e-5, rtol=1e-4)


def test_a_cancelled_row_leaves_at_once_and_the_others_stay_exact(tiny):
    head = _good_head(tiny)
    reqs = [Request(p, DecodeConfig(k=3, max_new_tokens=40), rid=str(i)) for i, p in enumerate(_prompts(5, seed=3))]

    def cancel_third(dec, steps):
        if steps == 6:
            reqs[2].cancelled = True

    dec = BatchDecoder(tiny, head, slots=5, max_context=256)
    done = _serve(dec, reqs, join_every=1, on_step=cancel_third)
    assert isinstance(done["2"].error, Cancelled) and len(done["2"].sequence) < len(reqs[2].prompt) + 40
    for r in reqs:
        if r.rid != "2":
            assert done[r.rid].g.tokens == target_generate(tiny, r.prompt, r.params, max_context=256).tokens


def test_a_long_prompt_joins_without_stalling_the_running_rows(tiny):
    """A 200-token prompt prefills 16 tokens a step: the running row gains tokens every step
    of it, and both outputs are the target's."""
    head = _good_head(tiny)
    short = Request(_prompts(1, seed=4)[0], DecodeConfig(k=2, max_new_tokens=120), rid="short")
    long_prompt = torch.randint(1, 90, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    long = Request(long_prompt, DecodeConfig(k=2, max_new_tokens=10), rid="long")
    dec = BatchDecoder(tiny, head, slots=2, max_context=512, prefill_chunk=16)
    dec.admit(short)
    while dec.joining:
        dec.step()
    dec.admit(long)
    grew = []
    while dec.joining:
        before = len(dec.running[0].sequence)
        dec.step()
        grew.append(len(dec.running[0].sequence) > before)
    assert len(grew) >= 200 // 16 and all(grew)
    done = _serve(dec, [])
    assert done["long"].g.tokens == target_generate(tiny, long_prompt, long.params, max_context=512).tokens
    assert done["short"].g.tokens == target_generate(tiny, short.prompt, short.params, max_context=512).tokens


def test_the_head_reads_a_prompt_as_it_prefills(tiny):
    """Chunk by chunk the head reads the prompt into its cache (the keys and values of reading it
    in one call), all but the last position: the first draft reads one position, not the prompt
    (it read hundreds, unpriced, in the step that drafted first)."""
    from tide.draft_head import DraftCache

    head = _good_head(tiny)
    prompt = _prompts(1, seed=6, lo=40, hi=41)[0]
    dec = BatchDecoder(tiny, head, slots=2, max_context=256, prefill_chunk=7)
    dec.admit(Request(prompt, DecodeConfig(k=3, max_new_tokens=4), rid="a"))
    while dec.joining:
        dec.step()
    row = dec.running[0]
    assert dec.heads.lengths[row.slot] == len(prompt) - 1 and row.pending_t == [row.y] and len(row.pending_f) == 1
    feats = target_forward(tiny, torch.tensor([prompt]), None).features[: len(prompt) - 1]
    whole = DraftCache()
    head(head.fuse(feats[None]), tiny.embed(torch.tensor([prompt[1:]])), torch.arange(len(prompt) - 1), whole)
    k, v = dec.heads.kv.read([row.slot], len(prompt) - 1)
    torch.testing.assert_close(k, whole.k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, whole.v, atol=1e-5, rtol=1e-4)
    done = _serve(dec, [])
    assert done["a"].g.tokens == target_generate(tiny, prompt, DecodeConfig(k=3, max_new_tokens=4), 256).tokens


def test_a_row_whose_callback_says_stop_ends_there(tiny):
    seen = []

    def stop_after_five(new):
        seen.extend(new)
        return len(seen) >= 5

    dec = BatchDecoder(tiny, _good_head(tiny), slots=2, max_context=256)
    reqs = [Request([5, 6, 7], DecodeConfig(k=3, max_new_tokens=50), rid="a", on_tokens=stop_after_five),
            Request([8, 9, 10, 11], DecodeConfig(k=3, max_new_tokens=50), rid="b")]
    done = _serve(dec, reqs, join_every=1)
    assert done["a"].g.finish_reason == "stop" and 5 <= len(done["a"].g.tokens) < 50
    assert seen == done["a"].g.tokens
    assert done["b"].g.tokens == target_generate(tiny, [8, 9, 10, 11], reqs[1].params, max_context=256).tokens


def test_sampling_inside_a_batch_matches_the_target_distribution():
    """Four sampled rows per batch (each its own seed), drafted by a noisy head: tokens 2 and 3
    of every row are distributed as the target alone samples them."""
    V = 10
    target = tiny_target(vocab=V, init=0.4, seed=1)
    target.model.generation_config.eos_token_id = None
    target.model.config.eos_token_id = None
    head = _noisy_head(target, V, scale=0.5, seed=2)
    prompt = [1, 4, 2]
    m2, m3 = _exact_marginals(target, prompt, V)
    n, c2, c3, accepted = 2000, torch.zeros(V), torch.zeros(V), 0
    dec = BatchDecoder(target, head, slots=4, max_context=64)
    for start in range(0, n, 4):
        reqs = [Request(prompt, DecodeConfig(k=2, max_new_tokens=3, temperature=1.0, seed=start + j, lookup_ngram=0),
                        rid=str(start + j)) for j in range(4)]
        for row in _serve(dec, reqs, join_every=1).values():
            c2[row.g.tokens[1]] += 1
            c3[row.g.tokens[2]] += 1
            accepted += row.g.accepted
    tv2 = 0.5 * float((c2 / n - m2).abs().sum())
    tv3 = 0.5 * float((c3 / n - m3).abs().sum())
    assert 0 < accepted < 2 * n
    assert tv2 < 0.05 and tv3 < 0.05, (tv2, tv3)
