import pytest

from tide.config import ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(overrides=["decode.k=7", "model.dtype=float32"])
    assert cfg.decode.k == 7 and cfg.model.dtype == "float32"
    assert cfg.model.source == "smollm2-135m"


@pytest.mark.parametrize("override, message", [
    (["decode.kk=3"], "kk"),
    (["nosuch.section=1"], "nosuch"),
    (["decode.k=three"], "three"),
    (["decode.k=0"], "decode.k must be >= 1"),
    (["model.dtype=int8"], "model.dtype"),
    (["decode.temperature=-1"], "temperature"),
    (["decode.k"], "key=value"),
    (["train.device=gpu"], "train.device must be cpu, cuda or cuda:N"),
    (["train.gen_synth_prompts=-1"], "train.gen_synth_prompts must be >= 0"),
    (["train.precision=fp8"], "train.precision must be auto, bfloat16 or float32"),
    (["train.gen_dtype=int8"], "train.gen_dtype must be auto"),
    (["model.bf16_kernel=yes"], "model.bf16_kernel must be auto, always or never"),
    (["decode.tree_topk=-1"], "decode.tree_topk must be >= 0"),
    (["decode.tree_tokens=0"], "decode.tree_tokens must be >= 1"),
    (["decode.tree_topk=64", "draft.vocab_size=32"], "cannot exceed draft.vocab_size"),
    (["decode.lookup_ngram=-1"], "decode.lookup_ngram must be >= 0"),
    (["decode.lookup_ngram=3", "decode.lookup_min_ngram=4"], "decode.lookup_min_ngram must be in"),
    (["decode.lookup_ngram=3", "decode.lookup_min_ngram=0"], "decode.lookup_min_ngram must be in"),
    (["decode.lookup_k=-1"], "decode.lookup_k must be >= 0"),
    (["decode.history_k=-1"], "decode.history_k must be >= 0"),
    (["serving.history_ngram=1"], "serving.history_ngram must be >= 2"),
    (["serving.history_tokens=0"], "serving.history_tokens must be >= 1"),
    (["serving.history_match_ngram=1"], "serving.history_match_ngram must be 0"),
    (["redis.answers_mb=0"], "redis.answers_mb must be >= 1"),
    (["serving.history_share=maybe"], "history_share"),
    (["decode.draft_threshold=1"], "decode.draft_threshold must be in"),
    (["decode.draft_threshold=-0.1"], "decode.draft_threshold must be in"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode:\n  nonsense: 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(bad)


def test_a_missing_gpu_is_a_clear_error():
    import torch

    from trainers.warm_start import train_device

    assert train_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            train_device("cuda")
