import torch

from tests.conftest import tiny_target
from tide.checkpoint import new_head
from tide.draft_head import DraftCache, DraftHead, DraftHeadConfig, build_draft_vocab


def _head(seed=0):
    target = tiny_target()
    head = new_head(target, 32, token_counts=torch.arange(96).flip(0), seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # leave the zero-init so attention and MLP both matter in the tests
        for p in head.midlayer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return target, head


def test_eagle3_parameter_names_and_vocab_maps():
    target, head = _head()
    names = set(head.state_dict())
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
    assert all(n.startswith(("fc.", "midlayer.", "norm.", "lm_head.", "d2t", "t2d")) for n in names)
    assert head.midlayer.self_attn.q_proj.in_features == 2 * target.config.hidden_size
    # the most frequent tokens (here: the lowest ids) form the draft vocabulary
    assert head.target_ids.tolist() == list(range(32))
    assert int(head.t2d.sum()) == 32 and bool(head.t2d[head.target_ids].all())


def test_build_draft_vocab_takes_most_frequent_then_lowest_ids():
    counts = torch.tensor([0, 5, 0, 9, 5, 0, 1])
    assert build_draft_vocab(counts, 4).tolist() == [1, 3, 4, 6]
    assert build_draft_vocab(torch.zeros(10), 3).tolist() == [0, 1, 2]


def test_incremental_cache_equals_full_causal_pass():
    target, head = _head()
    T, H = 9, target.config.hidden_size
    hidden, embeds = torch.randn(1, T, H), torch.randn(1, T, H)
    full, _ = head(hidden, embeds, torch.arange(T), DraftCache())
    cache = DraftCache()
    first, _ = head(hidden[:, :5], embeds[:, :5], torch.arange(5), cache)
    rest = [head(hidden[:, t : t + 1], embeds[:, t : t + 1], torch.tensor([t]), cache)[0]
            for t in range(5, T)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    cache.crop(3)
    assert len(cache) == 3


def test_training_time_test_attention_matches_inference_chain():
    """An unrolled training step must see exactly what a drafted token sees when serving."""
    target, head = _head()
    T, H = 8, target.config.hidden_size
    g, e0, e1, e2 = (torch.randn(1, T, H) for _ in range(4))
    pos = torch.arange(T)
    out0, base = head(g, e0, pos)
    out1, kv1 = head(out0, e1, pos + 1, ttt_base=base)
    out2, _ = head(out1, e2, pos + 2, ttt_base=base, ttt_diag=[kv1])
    for i in (0, 3, T - 1):  # serving: context entries 0..i, then a chain of two drafted tokens
        cache = DraftCache()
        o, _ = head(g[:, : i + 1], e0[:, : i + 1], pos[: i + 1], cache)
        c1, _ = head(o[:, -1:], e1[:, i : i + 1], torch.tensor([i + 1]), cache)
        c2, _ = head(c1, e2[:, i : i + 1], torch.tensor([i + 2]), cache)
        torch.testing.assert_close(c1[0, 0], out1[0, i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c2[0, 0], out2[0, i], atol=1e-5, rtol=1e-5)


def test_config_from_target_mirrors_its_layers():
    target = tiny_target()
    c = DraftHeadConfig.from_target(target.config, 1000)
    assert c.draft_vocab_size == 96  # never larger than the target's vocabulary
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert isinstance(DraftHead(c).lm_head, torch.nn.Linear)
