import random

import pytest
import torch

import tide.models
from tests.conftest import tiny_target
from tide.checkpoint import new_head
from tide.models import resolve_dtype
from trainers.target_data import generate_records
from trainers.train_step import evaluate, make_batches, make_optimizer, train_step
from trainers.warm_start import token_counts


@pytest.fixture(scope="module")
def peaked():
    return tiny_target(init=0.3, seed=1)  # a confident target: its next token can be learned


@pytest.fixture(scope="module")
def records(peaked):
    prompts = [[1 + i, 2 + 2 * i, 3 + 3 * i, 4 + i] for i in range(12)]
    return generate_records(peaked, prompts * 2, 40, batch_size=24, temperature=1.0, sampled_prefix=8)


def _train(peaked, records, bf16: bool, steps: int = 30):
    head = new_head(peaked, 32, token_counts(records, peaked.config.vocab_size), seed=0).float()
    rows = peaked.lm_head_weight[head.target_ids].float()
    opt = make_optimizer(head, 1e-2, 0.0)
    train, held = records[2:], records[:2]
    before = evaluate(head, peaked.embed, rows, held, 3, 64)
    rng = random.Random(0)
    losses = []
    for _ in range(steps):
        batch = next(make_batches(train, 64, 4, rng))
        losses.append(train_step(head, peaked.embed, rows, batch, opt, 3, 1.0, bf16=bf16)["loss"])
    return head, before, evaluate(head, peaked.embed, rows, held, 3, 64), losses


def test_bf16_autocast_training_keeps_fp32_weights_and_learns_like_fp32(peaked, records):
    _, before, after32, losses32 = _train(peaked, records, bf16=False)
    head16, _, after16, losses16 = _train(peaked, records, bf16=True)
    assert all(p.dtype == torch.float32 for p in head16.parameters())  # master weights stay fp32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in head16.parameters())
    # the same batches: the first losses agree to bf16 rounding, and both runs learn
    assert abs(losses16[0] - losses32[0]) < 0.02 * losses32[0]
    assert after32["loss"] < 0.9 * before["loss"] and after16["loss"] < 0.9 * before["loss"]
    assert abs(after16["loss"] - after32["loss"]) < 0.05 * after32["loss"]


def test_auto_dtype_is_bf16_only_on_cpus_with_bf16_units(monkeypatch):
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16", "cuda") == "bfloat16"
    monkeypatch.setattr(tide.models, "cpu_has_bf16_units", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda") == "float32"  # GPUs keep the measured fp32/TF32 recipe
    monkeypatch.setattr(tide.models, "cpu_has_bf16_units", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
