"""Lossless on the real default model: greedy speculative output == target-only greedy output,
token for token, in fp32 (bit-stable), for 20+ prompts, with a random and with a trained head;
and in bf16 where tide.kernels computes every row the same way in any pass (AVX2 CPUs)."""

import copy

import pytest
import torch

import tide.kernels as kernels
from tide.checkpoint import new_head
from tide.config import DecodeConfig, ModelConfig, load_config
from tide.models import KERNEL_ATTENTION, load_target
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


def _check(target, head, prompts, baselines, k, tree_topk=0, lookup_ngram=0, gens=None, history=None):
    params = DecodeConfig(max_new_tokens=40, k=k, tree_topk=tree_topk, tree_tokens=8,
                          lookup_ngram=lookup_ngram, lookup_min_ngram=1, history_k=7 if history else 0)
    accept = []
    for ids, expected in zip(prompts, baselines):
        g = speculative_generate(target, head, ids, params, history=history)
        assert g.tokens == expected
        accept.append(g.mean_accept_len)
        if gens is not None:
            gens.append(g)
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
    n = 6  # fp32 tree passes are slow on CPU: a few prompts (the chain tests cover all 20)
    tree = _check(smol_fp32, trained_head, prompts[:n], baselines[:n], k=3, tree_topk=3)
    assert sum(tree) > sum(chain_accept[:n])  # 8 candidates on 3 levels beat a chain of 3


def test_prompt_lookup_beside_the_head_is_exact(smol_fp32, prompts, baselines, trained_head):
    n, gens = 10, []  # half the prompts: CI time (the chain tests cover all 20)
    _check(smol_fp32, trained_head, prompts[:n], baselines[:n], k=3, lookup_ngram=3, gens=gens)
    looked = sum(g.lookup_passes for g in gens)
    assert 0 < looked < sum(g.passes for g in gens)  # copies and the head both drafted
    assert sum(g.lookup_accepted for g in gens) > 0


def test_answer_history_beside_lookup_and_the_head_is_exact(smol_fp32, prompts, baselines, trained_head):
    """Repeated prompts are drafted from their first answers (copies), new ones partly from
    what the answers share (chains); the output stays the target's own."""
    from tide.lookup import AnswerHistory

    history, gens = AnswerHistory(min_count=1), []
    for ids, answer in zip(prompts[:4], baselines[:4]):
        history.add(ids, answer)
    _check(smol_fp32, trained_head, prompts[:8], baselines[:8], k=3, lookup_ngram=3, gens=gens, history=history)
    repeats, new = gens[:4], gens[4:]
    # drafted whole: every token after the first came from a copy or its pass's bonus token
    assert all(g.history_passes == g.passes and g.history_accepted + g.passes >= len(g.tokens) - 1 for g in repeats)
    assert sum(g.history_passes for g in new) > 0 and sum(g.passes for g in repeats) < sum(g.passes for g in new)


@pytest.mark.skipif(not kernels.can_run(), reason="tide.kernels needs an x86 CPU with AVX2")
def test_bf16_on_the_kernels_is_exact_too(prompts, trained_head):
    # torch's bf16 products and SDPA sum a row differently for 1 and for n rows: on them bf16
    # speculation drifts from the bf16 target alone within a few dozen tokens on most prompts
    target = load_target(ModelConfig(dtype="bfloat16", bf16_kernel="always"))
    assert target.config._attn_implementation == KERNEL_ATTENTION
    head = copy.deepcopy(trained_head).to(torch.bfloat16)
    n = 6
    baselines = [target_generate(target, ids, DecodeConfig(max_new_tokens=40)).tokens for ids in prompts[:n]]
    chain = _check(target, head, prompts[:n], baselines, k=3)
    tree = _check(target, head, prompts[:n // 2], baselines[:n // 2], k=3, tree_topk=3)
    assert sum(chain) / n > 1.0 and sum(tree) / (n // 2) > 1.0  # accepted drafts, not only rejections


@pytest.mark.skipif(kernels.kernel_rows("auto") < 4,
                    reason="auto gives 4-row passes to torch's bf16 on this CPU (AMX, or no AVX2)")
def test_bf16_default_is_exact_on_narrow_passes(prompts, trained_head):
    """The default `model.bf16_kernel=auto`: the kernel takes every pass on AVX2-only CPUs and the
    passes of up to 128 rows on AVX512-BF16 CPUs without AMX, so a chain of 3 (4-row passes) is
    token-identical to the bf16 target alone, while long prefills run where they are fastest."""
    target = load_target(ModelConfig(dtype="bfloat16"))
    head = copy.deepcopy(trained_head).to(torch.bfloat16)
    n = 4
    baselines = [target_generate(target, ids, DecodeConfig(max_new_tokens=40)).tokens for ids in prompts[:n]]
    assert sum(_check(target, head, prompts[:n], baselines, k=3)) / n > 1.0


@pytest.mark.skipif(not kernels.can_run(), reason="tide.kernels needs an x86 CPU with AVX2")
def test_a_batch_in_bf16_on_the_kernels_is_exact(prompts, trained_head):
    """The batched decoder's packed passes (rows of several widths in one sequence, each token
    reading its own row's cache in place) in bf16 on the kernels: 12 staggered requests through 6
    slots, head chains, trees and lookup copies in the same passes, token-identical to the bf16
    target alone serving each request by itself."""
    from tide.batch import BatchDecoder, Request

    target = load_target(ModelConfig(dtype="bfloat16", bf16_kernel="always"))
    head = copy.deepcopy(trained_head).to(torch.bfloat16)
    chains, trees = DecodeConfig(max_new_tokens=40, k=4), DecodeConfig(max_new_tokens=40, k=3, tree_topk=3)
    params = [chains if i % 2 else trees for i in range(12)]
    baselines = [target_generate(target, ids, p).tokens for ids, p in zip(prompts[:12], params)]
    dec = BatchDecoder(target, head, slots=6, max_context=2048, prefill_chunk=48)
    queue = [Request(ids, p, rid=str(i)) for i, (ids, p) in enumerate(zip(prompts[:12], params))]
    done, steps = {}, 0
    while queue or dec.busy():
        if queue and dec.has_room() and steps % 3 == 0:
            dec.admit(queue.pop(0))
        done.update((row.req.rid, row) for row in dec.step())
        steps += 1
    for i, base in enumerate(baselines):
        assert done[str(i)].error is None and done[str(i)].g.tokens == base, i
    assert sum(done[str(i)].g.accepted for i in range(12)) > 0


@pytest.mark.parametrize("controller", ["auto", "fixed"])
def test_a_batch_of_staggered_requests_is_exact(smol_fp32, prompts, baselines, trained_head, controller):
    """Continuous batching on the real model (fp32): 20 requests through 8 slots, joining every
    other step, prompts prefilled 32 tokens a step, the default controller pricing the batch
    (what it drafts depends on this machine's costs), or every row drafting head chains of 5
    beside prompt lookup (fixed): every request's tokens are the target alone's."""
    from tide.batch import BatchDecoder, Request
    from tide.policy import policy_from_config

    params = DecodeConfig(max_new_tokens=40)
    policy = None if controller == "fixed" else policy_from_config(params, smol_fp32, trained_head, 2048, reps=1,
                                                                    batch=8)
    dec = BatchDecoder(smol_fp32, trained_head, slots=8, max_context=2048, policy=policy, prefill_chunk=32)
    queue, done, steps, widest = [Request(p, params, rid=str(i)) for i, p in enumerate(prompts)], {}, 0, 0
    while queue or dec.busy():
        if queue and dec.has_room() and steps % 2 == 0:
            dec.admit(queue.pop(0))
        done.update((row.req.rid, row) for row in dec.step())
        widest = max(widest, len(dec.running))
        steps += 1
    assert widest == 8
    for i, base in enumerate(baselines):
        assert done[str(i)].error is None and done[str(i)].g.tokens == base, i
    if controller == "fixed":
        assert sum(done[str(i)].g.accepted for i in range(len(prompts))) > 0
