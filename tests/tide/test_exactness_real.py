"""Lossless on the real default model: greedy speculative output == target-only greedy output,
token for token, in fp32 (bit-stable), for 20+ prompts, with a random and with a trained head."""

import pytest
import torch

from tide.checkpoint import new_head
from tide.config import DecodeConfig, load_config
from tide.prompts import encode, load_prompts
from tide.speculative import speculative_generate, target_generate
from trainers.target_data import generate_records
from trainers.warm_start import token_counts, train_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts(smol_fp32):
    return [encode(smol_fp32.tokenizer, p) for p in load_prompts("builtin")[:20]]


@pytest.fixture(scope="module")
def baselines(smol_fp32, prompts):
    params = DecodeConfig(max_new_tokens=40)
    return [target_generate(smol_fp32, ids, params).tokens for ids in prompts]


@pytest.fixture(scope="module")
def trained_head(smol_fp32):
    cfg = load_config(overrides=["train.epochs=1", "train.seq_len=256", "train.lr=5e-3"])
    records = generate_records(smol_fp32, load_prompts("builtin")[20:36], 48, 8)
    head = new_head(smol_fp32, 4096, token_counts(records, smol_fp32.config.vocab_size))
    train_head(head, smol_fp32, records[2:], records[:2], cfg)
    return head.float().eval()


def _check(target, head, prompts, baselines, k, tree_topk=0):
    params = DecodeConfig(max_new_tokens=40, k=k, tree_topk=tree_topk, tree_tokens=8)
    accept = []
    for ids, expected in zip(prompts, baselines):
        g = speculative_generate(target, head, ids, params)
        assert g.tokens == expected
        accept.append(g.mean_accept_len)
    return accept  # per prompt


def test_random_head_is_exact(smol_fp32, prompts, baselines):
    head = new_head(smol_fp32, 8192, seed=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.midlayer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert len(prompts) >= 20
    _check(smol_fp32, head, prompts, baselines, k=4)


@pytest.fixture(scope="module")
def chain_accept(smol_fp32, prompts, baselines, trained_head):
    return _check(smol_fp32, trained_head, prompts, baselines, k=3)


def test_trained_head_is_exact_and_accepts(chain_accept):
    assert sum(chain_accept) / len(chain_accept) > 1.0  # the accept path (not only rejections) ran


def test_draft_tree_is_exact_and_accepts_more(smol_fp32, prompts, baselines, trained_head, chain_accept):
    n = 10  # fp32 tree passes are slow on CPU: half the prompts (the chain tests cover all 20)
    tree = _check(smol_fp32, trained_head, prompts[:n], baselines[:n], k=3, tree_topk=3)
    assert sum(tree) > sum(chain_accept[:n])  # 8 candidates on 3 levels beat a chain of 3
