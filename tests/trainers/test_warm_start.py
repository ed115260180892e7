import json

from tide.checkpoint import load_draft
from tide.config import load_config
from tide.models import load_target
from tide.prompts import Prompt
from tide.records import load_records
from trainers.warm_start import warm_start

PROMPTS = [Prompt(t, chat=True) for t in
           ["Hi", "Name three rivers in Europe.", "2+2?", "Write a haiku about rain.", "Sort [3, 1, 2].",
            "What is a prime number?", "Say hello in French.", "Count to five.", "Define entropy.",
            "Give me a word that rhymes with cat.", "Why is the sky blue?"]]


def test_warm_start_writes_a_loadable_head_and_reuses_its_records(tiny_model_dir, tmp_path):
    cfg = load_config(overrides=[f"model.source={tiny_model_dir}", "model.dtype=float32", "draft.vocab_size=64",
                                 "train.epochs=2", "train.gen_samples=3", "train.gen_max_new_tokens=12",
                                 "train.gen_batch_size=8", "train.seq_len=64"])
    summary = warm_start(cfg, PROMPTS, tmp_path / "draft", tmp_path / "records")
    assert summary["records"] == 3 * len(PROMPTS) == len(load_records(tmp_path / "records"))
    assert summary["device"] == "cpu" and summary["generated_tokens"] > 0
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    saved = json.loads((tmp_path / "draft" / "train_metrics.json").read_text())
    assert saved["history"] == summary["history"]
    head, version = load_draft(tmp_path / "draft", load_target(cfg.model))  # strict load
    assert version == 1 and head.config.draft_vocab_size == 64
    # a second run with other training settings reads the same records instead of generating
    cfg.train.epochs = 1
    again = warm_start(cfg, PROMPTS, tmp_path / "draft2", tmp_path / "records")
    assert again["records"] == summary["records"] and again["generated_tokens"] == summary["generated_tokens"]
