import pytest
import torch

from tide.rejection import accept_greedy, accept_sampling, greedy_ids, target_probs


def test_greedy_accepts_longest_matching_prefix():
    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([3, 5, 7, 9]):
        logits[row, tok] = 1.0
    assert accept_greedy(torch.tensor([3, 5, 7]), logits) == (3, 9)  # all accepted + bonus
    assert accept_greedy(torch.tensor([3, 6, 7]), logits) == (1, 5)  # recovered at position 2
    assert accept_greedy(torch.tensor([0, 5, 7]), logits) == (0, 3)  # a later match is not enough


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_ids_are_argmax_first_on_ties(dtype):
    """The target's greedy token is argmax's, ties included (the first), in the dtypes decode uses."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (17, 49152), generator=g).to(dtype)  # every row ties many times
    assert torch.equal(greedy_ids(logits), logits.argmax(-1))
    assert torch.equal(greedy_ids(logits[0]), logits[0].argmax())
    tie = torch.zeros(2, 50, dtype=dtype)
    tie[:, [7, 40]] = 1.0
    assert greedy_ids(tie).tolist() == [7, 7]


def test_target_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(target_probs(logits, 1.0)[0], torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (target_probs(logits, 1.0, top_k=2)[0, 2:] == 0).all()
    p = target_probs(logits, 1.0, top_p=0.7)[0]  # 0.5 + 0.3 reaches 0.7: keep two
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert target_probs(logits, 1.0, top_p=0.01)[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def _wrong_rule(draft_tokens, draft_probs, target_p, generator):
    """A subtly biased rule: on rejection resample from p instead of the residual."""
    k = draft_tokens.shape[0]
    for i in range(k):
        d = draft_tokens[i]
        if torch.rand(1, generator=generator) * draft_probs[i, d] >= target_p[i, d]:
            return i, int(torch.multinomial(target_p[i], 1, generator=generator))
    return k, int(torch.multinomial(target_p[k], 1, generator=generator))


def _emitted_first_and_second(rule, p, q, n, seed):
    gen = torch.Generator().manual_seed(seed)
    V = p.shape[1]
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        d = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(q.shape[0])])
        a, z = rule(d, q, p, gen)
        emitted = [*d[:a].tolist(), z]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    return first / first.sum(), second / second.sum()


def test_sampling_reproduces_target_distribution():
    """Emitted tokens follow p exactly; the same statistic catches a biased rule."""
    torch.manual_seed(0)
    V, k, n = 8, 2, 20000
    p = torch.softmax(2.0 * torch.randn(k + 1, V), dim=-1)
    q = torch.softmax(2.0 * torch.randn(k, V), dim=-1)  # a poor draft: many rejections
    first, second = _emitted_first_and_second(accept_sampling, p, q, n, seed=1)
    tv = lambda a, b: 0.5 * float((a - b).abs().sum())
    bound = 0.02  # expected TV from sampling noise alone is ~0.005 at n=20000, V=8
    assert tv(first, p[0]) < bound
    assert tv(second, p[1]) < 2 * bound  # fewer samples: only runs that accepted d_1
    wrong_first, _ = _emitted_first_and_second(_wrong_rule, p, q, n, seed=1)
    assert tv(wrong_first, p[0]) > bound, "the test must be able to fail for a biased rule"


def test_identical_draft_and_target_always_accepts():
    p = torch.softmax(torch.randn(3, 6), dim=-1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        d = torch.stack([torch.multinomial(p[i], 1, generator=gen)[0] for i in range(2)])
        a, _ = accept_sampling(d, p[:2], p, gen)
        assert a == 2
