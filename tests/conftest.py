"""Shared fixtures: tiny random targets for unit tests, the real default model (fp32) where
exactness on a real model matters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tide.config import ModelConfig
from tide.models import Target

torch.set_num_threads(2)


def tide_cli(*args, env=None, timeout=600):
    """`python -m tide.cli ARGS` as a user runs it, output captured."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tide.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


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


def save_tiny_model_dir(path, vocab_source="smollm2-135m", seed=0, hidden=64, layers=4):
    """A tiny random llama with the real SmolLM2 tokenizer, saved as a HF folder, so config,
    actors and the HTTP front load it like any model (`model.source=<folder>`)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from tide.models import resolve_source

    folder, _ = resolve_source(ModelConfig(source=vocab_source))
    tok = AutoTokenizer.from_pretrained(folder)
    target = tiny_target(vocab=len(tok), hidden=hidden, layers=layers, seed=seed)
    target.model.generation_config.eos_token_id = tok.eos_token_id
    target.model.config.eos_token_id = tok.eos_token_id
    path = Path(path)
    target.model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis server of our own on a free port (never the shared 6379)."""
    from tide.transport.redis_server import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="tide-tests",
             _node_ip_address="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()
