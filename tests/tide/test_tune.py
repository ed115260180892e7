import pytest
import torch

from tests.tide.test_lookup import _repetitive_prompts
from tests.tide.test_speculative import _good_head, _noisy_head
from tide.config import DecodeConfig
from tide.lookup import AnswerHistory
from tide.speculative import speculative_generate
from tide.tree import DraftTree
from tide.tune import (
    TREE_SHAPES,
    Answer,
    Costs,
    Setting,
    answer,
    chain_length,
    history_table,
    lookup_table,
    replay,
    run_tune,
)


def _peaked(head):
    with torch.no_grad():
        head.lm_head.weight.mul_(10)  # a fresh head's distributions are nearly flat
    return head


def test_chain_length_keeps_the_first_token_and_cuts_where_propose_does():
    p = torch.tensor([0.9, 0.5, 0.9, 0.1])
    assert chain_length(p, 4, 0.0) == 4
    assert chain_length(p, 3, 0.0) == 3
    assert chain_length(p, 4, 0.4) == 3  # running products 0.9, 0.45, 0.405, 0.04
    assert chain_length(torch.tensor([0.1, 0.9]), 2, 0.5) == 1  # the first token always
    assert chain_length(p, 4, 0.95) == 1


def test_head_draft_cost_counts_the_calls_propose_makes():
    c = Costs(target_step=10.0, verify=[0.0] * 5, draft_call=1.0, draft_logits=0.1)
    assert c.chain_draft_ms(3, 3) == pytest.approx(3 * 1.0 + 3 * 0.1)  # feed + 2 chain calls, 3 heads
    assert c.chain_draft_ms(1, 3) == pytest.approx(2 * 1.0 + 2 * 0.1)  # cut: one more of each


@pytest.mark.parametrize("setting", [Setting(3, 0.0, 0, 2, 0), Setting(5, 0.3, 0, 2, 0),
                                     Setting(3, 0.2, 3, 2, 0), Setting(2, 0.0, 3, 2, 9),
                                     Setting(2, 0.0, 3, 2, 0, history_k=6),
                                     Setting(1, 0.0, 3, 2, 7, history_k=7, history_match_ngram=4),
                                     Setting(2, 0.0, 3, 2, 0, history_k=6, history_match_ngram=0),
                                     Setting(1, 0.0, 0, 2, 0, tree=3), Setting(1, 0.0, 3, 2, 8, tree=2),
                                     Setting(1, 0.0, 3, 2, 7, history_k=7, tree=4),
                                     Setting(3, 0.0, 0, 2, 0, tree=3, tree_tokens=6),
                                     Setting(4, 0.0, 3, 2, 8, tree=2, tree_tokens=7, history_k=6)])
def test_replay_takes_the_passes_decode_takes(tiny, setting):
    """The replay's passes, lookup passes and drafted tokens are those of the real speculative
    loop under the same setting, on the same prompts: what it prices is what decode does. With a
    history, each prompt is asked twice and the history learns every answer after it, in the
    replay as in the loop: the second time it drafts from the first answer."""
    params = DecodeConfig(k=setting.k, max_new_tokens=40, draft_threshold=setting.draft_threshold,
                          lookup_ngram=setting.lookup_ngram, lookup_min_ngram=setting.lookup_min_ngram,
                          lookup_k=setting.lookup_k, history_k=setting.history_k, tree_topk=setting.tree,
                          tree_tokens=setting.tree_tokens or 16)
    costs = Costs(target_step=10.0, verify=[0.0] + [10.0 + w for w in range(1, 18)], draft_call=1.0,
                  draft_logits=0.1, tree_draft={setting.shape(): 0.5}, tree_verify={w: 10.5 + w for w in range(2, 9)})
    shapes = [setting.shape()] if setting.tree else []
    passes = tokens = 0
    for head in (_peaked(_noisy_head(tiny)), _peaked(_good_head(tiny))):
        prompts = list(_repetitive_prompts())
        history = real_history = None
        if setting.history_k:
            prompts = prompts[:2] * 2
            history, real_history = (AnswerHistory(min_count=1, match_ngram=setting.history_match_ngram)
                                     for _ in range(2))
        answers = [answer(tiny, head, p, params, 2048, max_k=5, tree_shapes=shapes) for p in prompts]
        lookups, _ = lookup_table(answers, [setting])
        recalls = history_table(answers, history, setting.history_k)[0] if history is not None else None
        r = replay(answers, setting, costs, lookups, recalls)
        real = []
        for p in prompts:
            real.append(speculative_generate(tiny, head, p, params, history=real_history))
            if real_history is not None:
                real_history.add(p, real[-1].tokens)
        assert r["passes"] == sum(g.passes for g in real)
        assert r["lookup_passes"] == sum(g.lookup_passes for g in real)
        assert r["history_passes"] == sum(g.history_passes for g in real)
        assert r["history_passes"] > 0 if setting.history_k else r["history_passes"] == 0
        assert r["drafted"] == sum(g.drafted for g in real)
        assert r["tokens"] == sum(len(g.tokens) - 1 for g in real)  # the first comes from prefill
        assert [a.ids[a.prompt_len :] for a in answers] == [g.tokens for g in real]
        passes, tokens = passes + r["passes"], tokens + r["tokens"]
    assert tokens > passes  # drafts were accepted: the comparison saw accepting passes


def test_replay_accepts_the_tree_path_the_answer_follows_and_prices_its_draft_and_masked_pass():
    """y = 10 and the answer goes on 11, 12: the tree holds 11 -> 12 beside wrong siblings, so
    one pass takes 11, 12 and the bonus 13; it costs a feed call, the tree's draft and a pass
    over 5 rows with a tree mask (not a chain's pass of 5)."""
    s = Setting(2, 0.0, 0, 2, 0, tree=2, tree_tokens=4)
    right = DraftTree(tokens=torch.tensor([11, 20, 12, 21]), parents=torch.tensor([-1, -1, 0, 0]),
                      depths=torch.tensor([1, 1, 2, 2]))
    wrong = DraftTree(tokens=torch.tensor([30, 31, 32, 33]), parents=torch.tensor([-1, -1, 0, 0]),
                      depths=torch.tensor([1, 1, 2, 2]))
    a = Answer(ids=[5, 6, 10, 11, 12, 13], prompt_len=2, chains=torch.zeros(4, 2, dtype=torch.long),
               probs=torch.zeros(4, 2), trees={s.shape(): [right, wrong, wrong, wrong]})
    c = Costs(target_step=10.0, verify=[0.0] + [100.0] * 8, draft_call=1.0, draft_logits=0.1,
              tree_draft={s.shape(): 2.0}, tree_verify={5: 12.0})
    r = replay([a], s, c, {})
    assert (r["tokens"], r["passes"], r["drafted"]) == (3, 1, 4)
    assert r["ms"] == pytest.approx(1.0 + 2.0 + 12.0)
    a.trees[s.shape()][0] = wrong  # nothing right: one token a pass, three passes
    r = replay([a], s, c, {})
    assert (r["tokens"], r["passes"], r["drafted"]) == (3, 3, 12)
    assert s.widest_pass() == 5 and s.overrides().endswith("decode.tree_topk=2 decode.tree_tokens=4")


def test_run_tune_ranks_every_setting_on_measured_costs(tiny):
    head = _peaked(_good_head(tiny))
    prompts = list(_repetitive_prompts())[:2]
    out = run_tune(tiny, head, prompts, DecodeConfig(max_new_tokens=24), 2048, max_k=3)
    rows = out["settings"]
    speedups = [r["predicted_speedup"] for r in rows]
    assert speedups == sorted(speedups, reverse=True) and all(s > 0 for s in speedups)
    assert out["best"] == rows[0]["overrides"] == out["best_any"]  # fp32: every setting is exact
    assert all(r["bit_exact"] for r in rows) and out["exact_rows"] is None
    assert len({r["overrides"] for r in rows}) == len(rows)  # each setting once
    assert {r["k"] for r in rows if not r["tree"]} == {1, 2, 3}
    assert {(r["k"], r["tree"], r["tree_tokens"]) for r in rows if r["tree"]} == {
        (1, 2, 2), (1, 3, 3), (1, 4, 4), *TREE_SHAPES}
    one_level = [r for r in rows if r["tree"] == 3 and r["k"] == 1]
    assert one_level and all("decode.tree_topk=3 decode.tree_tokens=3" in r["overrides"] for r in one_level)
    assert all(f"decode.k={d} " in r["overrides"] and f"decode.tree_topk={t} decode.tree_tokens={n}" in r["overrides"]
               for d, t, n in TREE_SHAPES for r in rows if (r["k"], r["tree"], r["tree_tokens"]) == (d, t, n))
    assert any(r["lookup_ngram"] for r in rows) and any(not r["lookup_ngram"] for r in rows)
    c = out["costs_ms"]
    assert len(c["verify"]) == 18 and all(v > 0 for v in c["verify"][1:]) and c["target_step"] > 0
    assert set(c["tree_draft"]) == {"1:2:2", "1:3:3", "1:4:4", *(":".join(map(str, t)) for t in TREE_SHAPES)}
    assert all(v > 0 for v in c["tree_draft"].values()) and all(v > 0 for v in c["tree_verify"].values())
    assert 0 < out["answer_tokens"] <= 2 * 24


def test_run_tune_prices_the_history_for_each_copy_match_length(tiny):
    """The history's copies are priced for every match length compared (0: chains only), each
    setting naming its own; on prompts asked twice, copies draft the repeats."""
    head = _peaked(_good_head(tiny))
    prompts = list(_repetitive_prompts())[:2] * 2
    out = run_tune(tiny, head, prompts, DecodeConfig(max_new_tokens=24, history_k=4), 2048, max_k=2,
                   history=AnswerHistory(match_ngram=8), match_ngrams=(0, 4, 8))
    rows = out["settings"]
    assert len({r["overrides"] for r in rows}) == len(rows)
    with_history = [r for r in rows if r["history_k"]]
    assert {r["history_match_ngram"] for r in with_history} == {0, 4, 8}
    assert all(r["overrides"].endswith(f"serving.history_match_ngram={r['history_match_ngram']}") for r in with_history)
    share = {n: max(r["history_pass_share"] for r in with_history if r["history_match_ngram"] == n) for n in (0, 4, 8)}
    assert share[4] > share[0] and share[8] > share[0]


def test_tune_cli_refuses_without_a_draft_or_prompts(tmp_path, capsys):
    from tide.cli import main

    assert main(["tune", "--prompts", "builtin"]) == 2
    assert "needs a trained draft" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["tune", "--prompts", str(empty), "--draft", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip()  # a message, not a traceback
    for bad in ("5:4", "5:1:16", "a:b:c"):
        assert main(["tune", "--prompts", "builtin", "--draft", str(tmp_path), "--trees", bad]) == 2
        assert "--trees" in capsys.readouterr().err


def test_tree_shapes_parse_depth_topk_tokens():
    from tide.cli import _tree_shapes

    assert _tree_shapes("2:3:4, 5:4:16") == ((2, 3, 4), (5, 4, 16))
    assert _tree_shapes("none") == ()


def test_best_is_the_fastest_setting_whose_passes_stay_bit_exact(tiny, monkeypatch):
    """In bf16 where tide's kernels take passes of up to 8 rows, wider settings (copies of 8+,
    chains of 8+) are priced but not picked: their passes leave the kernels' single-step bits."""
    import tide.tune as tune

    monkeypatch.setattr(tune, "exact_rows", lambda target: 8)
    head = _peaked(_good_head(tiny))
    out = run_tune(tiny, head, list(_repetitive_prompts())[:2], DecodeConfig(max_new_tokens=24), 2048, max_k=3)
    rows = {r["overrides"]: r for r in out["settings"]}
    assert out["exact_rows"] == 8 and rows[out["best"]]["bit_exact"]
    head = {o: r["tree_tokens"] if r["tree"] else r["k"] for o, r in rows.items()}  # a tree's pass: its nodes
    assert all(r["bit_exact"] == (max(head[o], r["lookup_k"] if r["lookup_ngram"] else 0) + 1 <= 8)
               for o, r in rows.items())
    assert any(r["tree"] and r["k"] < 8 and not r["bit_exact"] for r in rows.values())  # 5 deep, 16 nodes
    fastest_exact = max((r for r in rows.values() if r["bit_exact"]), key=lambda r: r["predicted_speedup"])
    assert rows[out["best"]]["predicted_speedup"] == fastest_exact["predicted_speedup"]
    assert out["best_any"] == out["settings"][0]["overrides"]
    assert Setting(1, 0.0, 3, 2, 7).widest_pass() == 8 and Setting(3, 0.0, 3, 2, 0, history_k=9).widest_pass() == 10
    assert Setting(1, 0.0, 0, 2, 0, tree=4).widest_pass() == 5
    assert Setting(5, 0.0, 3, 2, 7, tree=4, tree_tokens=16).widest_pass() == 17
