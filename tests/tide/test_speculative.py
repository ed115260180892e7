import pytest
import torch

from tests.conftest import tiny_target
from tide.checkpoint import new_head
from tide.config import DecodeConfig
from tide.speculative import (
    ContextTooLong,
    accept,
    commit,
    propose,
    speculative_generate,
    start,
    target_forward,
    target_generate,
    verify,
)


def _noisy_head(target, vocab=64, scale=0.3, seed=0):
    head = new_head(target, vocab, seed=seed).float()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.midlayer.parameters():
            p.add_(scale * torch.randn_like(p))
    return head


def _good_head(target):
    """A 'draft' that reads the target's top layer: on a tiny model it agrees often."""
    return new_head(target, target.config.vocab_size)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_matches_target_alone(tiny, k):
    params = DecodeConfig(k=k, max_new_tokens=40)
    for head in (_noisy_head(tiny), _good_head(tiny)):
        for seed in range(4):
            prompt = torch.randint(1, 90, (5 + seed,), generator=torch.Generator().manual_seed(seed))
            base = target_generate(tiny, prompt.tolist(), params)
            spec = speculative_generate(tiny, head, prompt.tolist(), params)
            assert spec.tokens == base.tokens
            assert spec.finish_reason == base.finish_reason


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_draft_threshold_cuts_chains_and_stays_exact(tiny, tau):
    """A chain stops where the draft's own probability of it drops below decode.draft_threshold:
    chains of 1..k tokens, the output still the target's. The heads' LM heads are scaled up so
    their distributions are peaked (a fresh head's are nearly flat: every chain would stop)."""
    k = 6
    params = DecodeConfig(k=k, max_new_tokens=40, draft_threshold=tau)
    drafted = passes = longer = 0
    for head in (_noisy_head(tiny), _good_head(tiny)):
        with torch.no_grad():
            head.lm_head.weight.mul_(10)
        for seed in range(4):
            prompt = torch.randint(1, 90, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
            base = target_generate(tiny, prompt, params)
            spec = speculative_generate(tiny, head, prompt, params)
            assert spec.tokens == base.tokens
            assert spec.passes <= spec.drafted <= k * spec.passes
            drafted, passes = drafted + spec.drafted, passes + spec.passes
            longer += spec.drafted > spec.passes
    assert drafted < k * passes  # some chains were cut short
    assert longer > 0  # and some ran past their first token


def test_accounting_and_acceptance_length(tiny):
    params = DecodeConfig(k=4, max_new_tokens=60)
    g = speculative_generate(tiny, _good_head(tiny), [1, 2, 3, 4], params)
    assert g.drafted == 4 * g.passes
    assert g.accepted == g.accepted_per_pos[0] + sum(g.accepted_per_pos[1:])
    assert all(a >= b for a, b in zip(g.accepted_per_pos, g.accepted_per_pos[1:]))
    assert g.mean_accept_len == pytest.approx((g.accepted + g.passes) / g.passes)
    assert g.mean_accept_len > 1.0  # this draft agrees with the target at least sometimes


def test_cache_rollback_leaves_exactly_the_verified_prefix(tiny):
    params = DecodeConfig(k=4)
    head = _noisy_head(tiny, scale=0.05)
    prompt = [5, 17, 33, 2, 9, 41]
    s = start(tiny, prompt, params, None)
    with torch.inference_mode():
        for _ in range(3):
            d, q = propose(head, tiny.embed, s, params, params.k, None)
            vout = verify(tiny, s, d)
            a, z = accept(vout, d, q, params, None)
            commit(s, vout, list(range(a + 1)), d[:a], z, capture=False)
            assert s.target_cache.get_seq_length() == s.length == len(s.sequence) - 1
            assert len(s.draft_cache) == s.length - s.pending_tokens.shape[0]
        # the rolled-back cache continues exactly like a fresh pass over the same tokens
        step = target_forward(tiny, torch.tensor([[s.next_token]]), s.target_cache)
        fresh = target_forward(tiny, torch.tensor([s.sequence]), None)
        torch.testing.assert_close(step.logits[-1], fresh.logits[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step.features[-1], fresh.features[-1], atol=1e-4, rtol=1e-4)


def test_capture_covers_every_verified_position(tiny):
    g = speculative_generate(tiny, _noisy_head(tiny), [3, 4, 5], DecodeConfig(k=3, max_new_tokens=20),
                             capture=True)
    T = g.features.shape[0]
    assert len(g.sequence) == T + 1 and g.final_hidden.shape[0] == T
    assert g.sequence[3 : 3 + len(g.tokens)] == g.tokens
    fresh = target_forward(tiny, torch.tensor([g.sequence[:-1]]), None)
    torch.testing.assert_close(g.features, fresh.features, atol=1e-4, rtol=1e-4)


def test_stops_at_eos_and_max_tokens():
    target = tiny_target(vocab=16, init=0.5, seed=3)
    params = DecodeConfig(k=3, max_new_tokens=200)
    base = target_generate(target, [1, 2, 3], params)
    spec = speculative_generate(target, _noisy_head(target, 16), [1, 2, 3], params)
    assert spec.tokens == base.tokens
    if base.finish_reason == "stop":
        assert spec.tokens[-1] == 15 and 15 not in spec.tokens[:-1]
    short = speculative_generate(target, _noisy_head(target, 16), [1, 2, 3], DecodeConfig(k=5, max_new_tokens=2))
    assert len(short.tokens) <= 2


def test_context_limit(tiny):
    with pytest.raises(ContextTooLong, match="shorten the prompt"):
        speculative_generate(tiny, _noisy_head(tiny), list(range(1, 40)), DecodeConfig(), max_context=32)
    g = speculative_generate(tiny, _noisy_head(tiny), list(range(1, 20)), DecodeConfig(k=5, max_new_tokens=100),
                             max_context=32)
    assert 19 + len(g.tokens) <= 32 and g.finish_reason == "length"
    assert g.tokens == target_generate(tiny, list(range(1, 20)), DecodeConfig(max_new_tokens=100),
                                       max_context=32).tokens


def _exact_marginals(target, prompt, V):
    """P(t2), P(t3) of the target alone, by enumerating t1 and t2."""
    with torch.inference_mode():
        p1 = torch.softmax(target_forward(target, torch.tensor([prompt]), None, hidden=False).logits[-1], -1)
        m2, m3 = torch.zeros(V), torch.zeros(V)
        for a in range(V):
            logits = target_forward(target, torch.tensor([[*prompt, a]]), None, hidden=False).logits[-1]
            p2 = torch.softmax(logits, -1)
            m2 += p1[a] * p2
            seqs = torch.tensor([[*prompt, a, b] for b in range(V)])
            p3 = torch.softmax(target.model(seqs).logits[:, -1], -1)  # (V, V)
            m3 += p1[a] * (p2[:, None] * p3).sum(0)
    return m2, m3


@pytest.mark.parametrize("lookup,lookup_k,tau,recall", [(0, 0, 0.0, 0), (1, 3, 0.0, 0), (0, 0, 0.3, 0), (0, 0, 0.0, 3)])
def test_sampling_end_to_end_matches_target_distribution(lookup, lookup_k, tau, recall):
    """Tokens 2 and 3 go through draft + rejection; their marginals must equal the target's.
    With lookup, drafts copied from the prompt (a point-mass draft distribution) take turns with
    the head's; lookup_k=3 copies more tokens than the head drafts (k=2). With a draft threshold
    the chain's length depends on what the draft sampled. With recall, chains of up to 3 tokens
    from an answer history (point masses too) take turns with the head's."""
    from tide.lookup import AnswerHistory

    V = 10
    target = tiny_target(vocab=V, init=0.4, seed=1)
    target.model.generation_config.eos_token_id = None  # no early stop: every run yields 3 tokens
    target.model.config.eos_token_id = None
    head = _noisy_head(target, V, scale=0.5, seed=2)
    prompt = [1, 4, 2]
    m2, m3 = _exact_marginals(target, prompt, V)
    n = 2500
    c2, c3 = torch.zeros(V), torch.zeros(V)
    history = AnswerHistory(max_ngram=2, min_count=1) if recall else None
    g = torch.Generator().manual_seed(3)
    for _ in range(3 if recall else 0):  # some contexts decided, others tied: both kinds of pass
        history.add([], torch.randint(0, V, (12,), generator=g).tolist())
    accepted = drafted = looked = recalled = passes = 0
    for i in range(n):
        g = speculative_generate(target, head, prompt, DecodeConfig(
            k=2, max_new_tokens=3, temperature=1.0, seed=i, lookup_ngram=lookup, lookup_min_ngram=1,
            lookup_k=lookup_k, draft_threshold=tau, history_k=recall), history=history)
        c2[g.tokens[1]] += 1
        c3[g.tokens[2]] += 1
        accepted += g.accepted
        drafted += g.drafted
        looked += g.lookup_passes
        recalled += g.history_passes
        passes += g.passes
    tv2 = 0.5 * float((c2 / n - m2).abs().sum())
    tv3 = 0.5 * float((c3 / n - m3).abs().sum())
    assert 0 < accepted < n * 2  # both accept and reject paths were exercised
    assert (0 < looked < passes) if lookup else looked == 0, (looked, passes)  # lookup: both kinds
    assert (0 < recalled < passes) if recall else recalled == 0, (recalled, passes)
    if tau:
        assert passes < drafted < 2 * passes  # chains of one and of two tokens
    assert tv2 < 0.05 and tv3 < 0.05, (tv2, tv3)  # noise alone gives ~0.02 at n=2500, V=10


def test_streaming_callback_sees_every_token_once(tiny):
    for fn in (lambda cb: speculative_generate(tiny, _good_head(tiny), [1, 2, 3], DecodeConfig(k=3, max_new_tokens=30),
                                               on_tokens=cb),
               lambda cb: target_generate(tiny, [1, 2, 3], DecodeConfig(max_new_tokens=30), on_tokens=cb)):
        chunks = []
        g = fn(chunks.append)
        assert [t for c in chunks for t in c] == g.tokens and all(chunks)
