"""`tide bench` on a tiny model: the JSON carries what issue 2 asks for, and greedy speculation
in fp32 reproduces the target alone in both the benchmark dtype and (with spec_both) the other."""

from __future__ import annotations

from tide.bench import run_bench
from tide.config import load_config
from tide.prompts import Prompt


def test_bench_reports_both_dtypes_and_exactness(tiny_model_dir):
    cfg = load_config(overrides=[f"model.source={tiny_model_dir}", "model.dtype=float32",
                                 "decode.k=3", "decode.max_new_tokens=12", "model.skinny_matmul=true",
                                 "decode.policy=fixed"])
    workloads = {"a": [Prompt("one two three", chat=False), Prompt("four five", chat=False)],
                 "b": [Prompt("six seven eight nine", chat=False)]}
    out = run_bench(cfg, workloads, None, spec_both=True)
    for key in ("baseline_tok_s", "spec_tok_s", "speedup", "mean_accept_len", "accept_rate_per_pos",
                "exact_match", "n_prompts", "k", "dtype", "draft_version", "speedup_vs_fastest",
                "baseline_bfloat16_tok_s", "cost_ms"):
        assert key in out, key
    assert out["n_prompts"] == 3 and out["k"] == 3 and out["dtype"] == "float32"
    assert len(out["accept_rate_per_pos"]) == 3
    assert out["exact_match"] is True  # fp32 greedy: token-identical
    assert 1.0 <= out["mean_accept_len"] <= 4.0
    assert set(out["per_workload"]) == {"a", "b"}
    other = out["spec_other_dtype"]
    assert other["dtype"] == "bfloat16" and other["n_prompts"] == 3
    assert set(other["cost_ms"]) == {"draft_per_pass", "verify_per_pass", "target_per_token"}
    assert other["spec_tok_s"] > 0 and other["baseline_tok_s"] == out["baseline_bfloat16_tok_s"]


def test_bench_compares_a_tree_with_its_chain(tiny_model_dir):
    cfg = load_config(overrides=[f"model.source={tiny_model_dir}", "model.dtype=float32", "decode.k=3",
                                 "decode.tree_topk=3", "decode.tree_tokens=8", "decode.max_new_tokens=12",
                                 "decode.policy=fixed", "decode.lookup_ngram=0"])
    workloads = {"a": [Prompt("one two three", chat=False), Prompt("four five", chat=False)]}
    out = run_bench(cfg, workloads, None, chain_k=2)
    assert out["exact_match"] is True and out["chain"]["exact_prompts"] == 2
    assert out["chain"]["k"] == 2 and len(out["chain"]["accept_rate_per_pos"]) == 2
    assert 1.0 <= out["chain"]["mean_accept_len"] <= 3.0 and 1.0 <= out["mean_accept_len"] <= 4.0
    assert set(out["chain"]["per_workload"]) == {"a"} and out["chain"]["cost_ms"]["verify_per_pass"] > 0


def test_bench_reports_lookup_beside_the_head_against_the_head_alone(tiny_model_dir):
    cfg = load_config(overrides=[f"model.source={tiny_model_dir}", "model.dtype=float32", "decode.k=3",
                                 "decode.lookup_ngram=2", "decode.lookup_min_ngram=1",
                                 "decode.max_new_tokens=16", "decode.policy=fixed"])  # every match a lookup pass
    workloads = {"a": [Prompt("one two three one two three one two", chat=False)]}
    out = run_bench(cfg, workloads, None, chain_k=3)
    assert out["exact_match"] is True and out["chain"]["exact_prompts"] == 1
    assert 0 < out["lookup_pass_share"] <= 1 and out["lookup_accept_len"] >= 1.0
    assert "lookup_pass_share" not in out["chain"]  # the reference is the head alone
    assert out["per_workload"]["a"]["lookup_pass_share"] == out["lookup_pass_share"]


def test_bench_history_learns_each_answer_for_the_prompts_after_it(tiny_model_dir):
    """decode.history_k: the bench learns every prompt's answer once its runs are done, as a
    replica does; a prompt asked again drafts from the first answer, and the chain reference
    (the head alone) does not use the history."""
    cfg = load_config(overrides=[f"model.source={tiny_model_dir}", "model.dtype=float32", "decode.k=2",
                                 "decode.history_k=6", "decode.max_new_tokens=16", "decode.policy=fixed",
                                 "decode.lookup_ngram=0"])  # the history's own drafts, in the fixed order
    again = Prompt("one two three four", chat=False)
    out = run_bench(cfg, {"a": [again], "b": [again]}, None, chain_k=2)
    assert out["exact_match"] is True and out["chain"]["exact_prompts"] == 2
    assert "history_pass_share" not in out["per_workload"]["a"]  # the first time: nothing learned
    b = out["per_workload"]["b"]
    assert b["history_pass_share"] > 0 and b["history_accept_len"] > 2.0
    assert out["history_pass_share"] > 0 and "history_pass_share" not in out["chain"]
