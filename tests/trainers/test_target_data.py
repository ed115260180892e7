import pytest
import torch

from tide.config import DecodeConfig, ModelConfig
from tide.models import load_target
from tide.prompts import Prompt, encode, user_turn_prefix
from tide.speculative import target_forward, target_generate
from trainers.target_data import generate_records, synthesize_prompts

PROMPTS = [Prompt(t, chat=True) for t in
           ["Hi", "Name three rivers in Europe and say which is longest.", "2+2?", "Write a haiku about rain."]]


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return load_target(ModelConfig(source=str(tiny_model_dir), dtype="float32"))


def _teacher_forced(target, record):
    with torch.inference_mode():
        return target_forward(target, record.input_ids[None, :-1], None)


def test_greedy_answers_and_features_match_single_stream(target):
    records = generate_records(target, PROMPTS, 24, batch_size=3)  # 2 batches, left padding
    assert len(records) == len(PROMPTS)
    for prompt, rec in zip(PROMPTS, records):
        ids = encode(target.tokenizer, prompt)
        assert rec.prompt_len == len(ids) and rec.input_ids[: len(ids)].tolist() == ids
        expected = target_generate(target, ids, DecodeConfig(max_new_tokens=24)).tokens
        assert rec.input_ids[len(ids) :].tolist() == expected
        fresh = _teacher_forced(target, rec)
        assert rec.features.shape == fresh.features.shape
        torch.testing.assert_close(rec.features.float(), fresh.features, atol=2e-2, rtol=2e-2)  # bf16 storage
        torch.testing.assert_close(rec.final_hidden.float(), fresh.final_hidden, atol=2e-2, rtol=2e-2)


def test_sampled_prefix_then_greedy(target):
    prefix = 3
    records = generate_records(target, PROMPTS * 3, 20, batch_size=6, temperature=1.0, sampled_prefix=prefix,
                               seed=1)
    differs = 0
    for rec in records:
        greedy = _teacher_forced(target, rec).logits.argmax(-1)  # greedy choice after each position
        answer = rec.input_ids[rec.prompt_len :]
        chosen = greedy[rec.prompt_len - 1 :]
        off = (answer != chosen).nonzero()
        if len(off):
            differs += 1
            assert int(off[-1]) < prefix  # only the sampled prefix may leave the greedy path
    assert differs > 0  # some answers did take a sampled token (a random tiny model is not peaked)


def test_repeated_prompts_each_get_an_answer(target):
    """A prompt listed n times is prefilled once and answered n times (greedy: identically,
    alongside other prompts in the same left-padded batch)."""
    records = generate_records(target, PROMPTS * 2, 16, batch_size=8)
    assert len(records) == 2 * len(PROMPTS)
    for a, b in zip(records[: len(PROMPTS)], records[len(PROMPTS) :]):
        assert a.request_id != b.request_id
        assert a.input_ids.tolist() == b.input_ids.tolist()
        torch.testing.assert_close(a.features, b.features)
        torch.testing.assert_close(a.final_hidden, b.final_hidden)


@pytest.mark.slow
def test_the_target_writes_distinct_user_prompts(smol_fp32):
    prefix = user_turn_prefix(smol_fp32.tokenizer)
    assert smol_fp32.tokenizer.decode(prefix).endswith("<|im_start|>user\n")
    prompts = synthesize_prompts(smol_fp32, 8, batch_size=8, seed=0)
    assert 1 <= len(prompts) <= 8 and len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.chat and len(p.text) >= 8 and "<|im_" not in p.text
        # a synthesized prompt is an ordinary user turn: it renders and answers like any other
        assert encode(smol_fp32.tokenizer, p)[: len(prefix)] == prefix
