"""Shared fixtures: tiny random targets for unit tests, the real default model (fp32) where
exactness on a real model matters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tide.config import ModelConfig
from tide.models import Target

torch.set_num_threads(2)


def tiny_target(vocab: int = 96, hidden: int = 64, layers: int = 4, init: float = 0.02,
                seed: int = 0) -> Target:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      initializer_range=init, bos_token_id=0, eos_token_id=vocab - 1,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).float().eval().requires_grad_(False)
    model.generation_config.eos_token_id = vocab - 1
    return Target(model=model, tokenizer=None, model_id="tiny-llama", feature_layers=(1, 2, 3))


@pytest.fixture(scope="session")
def tiny():
    return tiny_target()


@pytest.fixture(scope="session")
def smol_fp32():
    """The real default model (SmolLM2-135M-Instruct) in fp32: greedy exactness is bit-stable."""
    from tide.models import load_target

    return load_target(ModelConfig(dtype="float32"))
