import pytest
import torch

from tests.tide.test_speculative import _good_head, _noisy_head
from tide.config import DecodeConfig
from tide.lookup import lookup_draft
from tide.speculative import accept, commit, feed_pending, speculative_generate, start, target_generate, verify


def _t(*ids):
    return torch.tensor(ids)


def test_copies_what_followed_the_suffix():
    assert lookup_draft(_t(1, 2, 3, 4, 5, 9, 2, 3), 3, 2, 3).tolist() == [4, 5, 9]
    # an occurrence near the end: the copy runs on into its own tokens (period 3)
    assert lookup_draft(_t(1, 2, 3, 1, 2), 3, 2, 5).tolist() == [3, 1, 2, 3, 1]


def test_longest_suffix_wins_over_a_more_recent_shorter_one():
    # "7 8" occurs at the end of ...5 7 8 | 1 and of 6 7 8 | 2; the 3-gram "6 7 8" decides
    seq = _t(6, 7, 8, 2, 0, 5, 7, 8, 1, 0, 6, 7, 8)
    assert lookup_draft(seq, 3, 2, 2).tolist() == [2, 0]
    assert lookup_draft(seq, 2, 2, 2).tolist() == [1, 0]  # 2-grams only: the most recent


def test_prefers_the_most_recent_occurrence_with_k_tokens_after_it():
    seq = _t(7, 7, 7, 7, 7, 7)
    assert lookup_draft(seq, 2, 1, 3).tolist() == [7, 7, 7]
    # "4" at 0 and 4, both with 3 tokens after: the later
    assert lookup_draft(_t(4, 1, 2, 9, 4, 3, 8, 4), 1, 1, 3).tolist() == [3, 8, 4]
    # "4" at 0 (3 tokens after) and 4 (2 after): the one with 3
    assert lookup_draft(_t(4, 1, 2, 9, 4, 3, 4), 1, 1, 3).tolist() == [1, 2, 9]
    # none with 3 tokens after: the latest, read on with period 2
    assert lookup_draft(_t(9, 4, 3, 4), 1, 1, 3).tolist() == [3, 4, 3]


def test_a_longer_match_copies_more_up_to_max_k():
    # "1 2 3" matches with one more token of agreement before it (7): m = 4
    seq = _t(7, 1, 2, 3, 4, 5, 6, 9, 9, 7, 1, 2, 3)
    assert lookup_draft(seq, 3, 2, 2, 10).tolist() == [4, 5, 6, 9]
    assert lookup_draft(seq, 3, 2, 2, 3).tolist() == [4, 5, 6]  # capped at max_k
    assert lookup_draft(seq, 3, 2, 2).tolist() == [4, 5]  # no max_k: always k
    assert lookup_draft(seq, 3, 2, 2, 0).tolist() == [4, 5]
    # nothing agrees before the 3-gram: m = 3
    assert lookup_draft(_t(8, 1, 2, 3, 4, 5, 6, 9, 9, 7, 1, 2, 3), 3, 2, 2, 10).tolist() == [4, 5, 6]
    # never fewer than k, however short the match
    assert lookup_draft(_t(8, 1, 2, 3, 4, 5, 6, 9, 9, 7, 1, 2, 3), 3, 2, 5, 10).tolist() == [4, 5, 6, 9, 9]
    # a long repeat: the match runs back to the start of the text
    text = list(range(10, 30))
    assert lookup_draft(_t(*text, *text[:12]), 2, 2, 3, 16).tolist() == (text + text)[12:24]  # m = 12


def test_no_match_no_draft():
    assert lookup_draft(_t(1, 2, 3, 4), 3, 2, 4) is None  # no suffix repeats
    assert lookup_draft(_t(1, 2, 3, 2), 3, 2, 4) is None  # a 1-gram repeats, 2-grams do not
    assert lookup_draft(_t(1, 2, 3, 2), 3, 1, 4).tolist() == [3, 2, 3, 2]
    assert lookup_draft(_t(5), 3, 1, 4) is None  # nothing before the next token


def _repetitive_prompts():
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        motif = torch.randint(1, 90, (4 + i,), generator=g).tolist()
        yield motif * 3 + motif[:2]


@pytest.mark.parametrize("tree_topk,lookup_k", [(0, 0), (3, 0), (0, 9), (3, 9)])
def test_greedy_with_lookup_matches_target_alone(tiny, tree_topk, lookup_k):
    """Copied drafts go through the same verify: the output stays the target's own, and the head
    picks up where lookup left off (its skipped positions are fed on its next turn). lookup_k=9:
    copies longer than the head's k (and than a tree's depth)."""
    params = DecodeConfig(k=4, max_new_tokens=40, lookup_ngram=3, lookup_min_ngram=3,
                          tree_topk=tree_topk, tree_tokens=8, lookup_k=lookup_k)
    copied = beyond_k = 0
    lookups = heads = 0
    for head in (_noisy_head(tiny), _good_head(tiny)):
        for prompt in _repetitive_prompts():
            base = target_generate(tiny, prompt, params)
            spec = speculative_generate(tiny, head, prompt, params)
            assert spec.tokens == base.tokens
            lookups += spec.lookup_passes
            heads += spec.passes - spec.lookup_passes
            assert len(spec.accepted_per_pos) == params.k
            # accepted_per_pos counts min(a, k) per pass; the rest came from copies longer than k
            beyond_k += spec.accepted - sum(spec.accepted_per_pos)
            if not tree_topk:  # a chain's head drafts k per pass; the rest of drafted are copies
                copied += spec.drafted - params.k * (spec.passes - spec.lookup_passes)
            assert 0 <= spec.lookup_accepted <= spec.accepted
            if spec.lookup_passes == 0:
                assert spec.head_accept_len == spec.mean_accept_len
            elif spec.lookup_passes < spec.passes:
                head_passes = spec.passes - spec.lookup_passes
                assert spec.head_accept_len == pytest.approx(
                    (spec.accepted - spec.lookup_accepted + head_passes) / head_passes)
    assert lookups > 0 and heads > 0  # both kinds of pass ran
    if lookup_k > params.k:  # matches reach back over the motif: copies run past the head's k
        assert beyond_k > 0
        assert tree_topk or copied > params.k * lookups
    else:
        assert beyond_k == 0


@pytest.mark.parametrize("tree_topk", [0, 3])
def test_greedy_with_the_answer_history_matches_target_alone(tiny, tree_topk):
    """A history that learned the target's answers to some prompts (and to others, answers the
    target never gives) drafts its copies before prompt lookup and its chains where lookup finds
    nothing; the output stays the target's own, with the history's copies, lookup's copies, the
    history's chains and the head's drafts taking turns."""
    from tide.lookup import AnswerHistory

    class Counted(AnswerHistory):  # which of the history's drafts the loop took
        copies = chains = 0

        def copy(self, sequence, k):
            out = super().copy(sequence, k)
            self.copies += out is not None
            return out

        def chain(self, sequence, k):
            out = super().chain(sequence, k)
            self.chains += out is not None
            return out

    params = DecodeConfig(k=3, max_new_tokens=40, lookup_ngram=3, lookup_min_ngram=3, history_k=6,
                          tree_topk=tree_topk, tree_tokens=8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 90, (6,), generator=g).tolist() for _ in range(4)]
    history = Counted(max_ngram=3, min_count=1, match_ngram=4)
    for p in prompts[:2]:  # answers seen before: the history is right on them
        history.add(p, target_generate(tiny, p, params).tokens)
    for p in prompts[2:]:  # answers never given (every 5th token off): drafts partly rejected
        right = target_generate(tiny, p, params).tokens
        history.add(p, [t if i % 5 else (t + 1) % 90 for i, t in enumerate(right)])
    recalled = accepted = rejected = 0
    for prompt in prompts:
        base = target_generate(tiny, prompt, params)
        spec = speculative_generate(tiny, _noisy_head(tiny), prompt, params, history=history)
        assert spec.tokens == base.tokens
        recalled += spec.history_passes
        accepted += spec.history_accepted
        heads = spec.passes - spec.lookup_passes - spec.history_passes
        if heads:
            assert spec.head_accept_len == pytest.approx(
                (spec.accepted - spec.lookup_accepted - spec.history_accepted + heads) / heads)
        rejected += spec.history_passes and spec.history_accepted < spec.drafted - params.k * heads
    assert recalled > 0 and accepted > 0 and rejected > 0
    assert history.copies > 0 and history.chains > 0  # both kinds drafted


def test_skipped_positions_reach_the_draft_cache_in_order(tiny):
    """After passes drafted by lookup, the head reads the piled-up positions in one call and ends
    in the state it would have reached reading them one pass at a time."""
    params = DecodeConfig(k=3)
    head = _noisy_head(tiny, scale=0.05)
    prompt = [5, 17, 33, 2, 9, 41, 5, 17, 33]
    with torch.inference_mode():
        lazy, eager = start(tiny, prompt, params, None), start(tiny, prompt, params, None)
        for _ in range(3):
            for s, feed in ((lazy, False), (eager, True)):
                if feed:
                    feed_pending(head, tiny.embed, s)
                d = _t(*s.sequence[-3:])  # any tokens: a draft the head did not write
                out = verify(tiny, s, d)
                a, z = accept(out, d, None, params, None)
                commit(s, out, list(range(a + 1)), d[:a], z, capture=False)
                assert len(s.draft_cache) == s.length - s.pending_tokens.shape[0]
        assert lazy.sequence == eager.sequence
        assert lazy.pending_tokens.shape[0] > eager.pending_tokens.shape[0]
        last_lazy, last_eager = feed_pending(head, tiny.embed, lazy), feed_pending(head, tiny.embed, eager)
        assert len(lazy.draft_cache) == len(eager.draft_cache) == lazy.length
        torch.testing.assert_close(last_lazy, last_eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lazy.draft_cache.k, eager.draft_cache.k, atol=1e-5, rtol=1e-5)


def test_history_drafts_what_followed_most_often():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=3, min_count=2, min_share=0.6)
    assert h.chain([1, 2], 4) is None  # knows nothing yet
    h.add([], [1, 2, 3, 4])
    assert h.chain([5, 1, 2], 4) is None  # seen once: below min_count
    h.add([], [1, 2, 3, 4])
    assert h.chain([5, 1, 2], 4) == [3, 4]  # nothing followed 4: the chain stops there
    assert h.chain([5, 1, 2], 1) == [3]  # k caps the chain
    h.add([], [1, 2, 7, 7])
    h.add([], [1, 2, 7, 7])
    assert h.chain([5, 1, 2], 4) is None  # 3 and 7 tie: undecided, no draft
    h.add([], [0, 1, 2, 9])
    h.add([], [0, 1, 2, 9])
    assert h.chain([0, 1, 2], 1) == [9]  # the longest known context decides
    assert h.chain([6, 1, 2], 1) is None  # (1, 2) alone: 3, 7, 9 tie
    assert len(h) == 6 and h.tokens == 24


def test_history_learns_an_answers_first_tokens_from_its_prompt():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=2, min_count=1)
    h.add([4, 7, 8], [1, 2])
    assert h.chain([3, 7, 8], 3) == [1, 2]  # (7, 8) -> 1: the prompt's end is the context
    assert h.chain([9, 4, 7], 1) is None  # prompt tokens before the last max_ngram are not learned
    assert h.tokens == 2


def test_history_forgets_the_oldest_answers_exactly():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=3, max_tokens=5, min_count=1)
    h.add([9], [1, 2, 3, 4])
    h.add([8], [5, 6, 7])
    h.add([8], [5, 6, 1])  # 10 tokens > 5: the oldest go until 3 are left
    only = AnswerHistory(max_ngram=3, max_tokens=5, min_count=1)
    only.add([8], [5, 6, 1])
    assert h._next == only._next and h.tokens == 3 and len(h) == 1
    assert h.chain([0, 1, 2], 2) is None and h.chain([0, 5, 6], 1) == [1]


def test_history_from_config_seeds_from_a_records_folder(tmp_path):
    from tide.config import load_config
    from tide.lookup import HistoryError, history_from_config
    from tide.records import HiddenStateRecord, save_records

    assert history_from_config(load_config(overrides=[])) is None  # decode.history_k=0: off
    ids = torch.tensor([5, 6, 1, 2, 3, 4])
    rec = HiddenStateRecord(request_id="r", target_model_id="m", draft_version=0, input_ids=ids,
                            features=torch.zeros(5, 6), final_hidden=torch.zeros(5, 2), prompt_len=2)
    save_records([rec, rec], tmp_path / "recs")

    def seeded(folder):
        return history_from_config(load_config(overrides=["decode.history_k=4", f"serving.history_records={folder}"]))

    h = seeded(tmp_path / "recs")
    assert len(h) == 2 and h.tokens == 8 and h.chain([5, 6], 4) == [1, 2, 3, 4]
    with pytest.raises(HistoryError, match="no such folder"):
        seeded(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "00000.rec").write_bytes(b"not a record")
    with pytest.raises(HistoryError, match="bad"):
        seeded(tmp_path / "bad")


def test_shared_answers_round_trip_and_bad_ones_are_refused():
    from tide.lookup import HistoryError, answer_from_bytes, answer_to_bytes

    data = answer_to_bytes("r0/ab12", [5, 6], [1, 2, 3])
    assert answer_from_bytes(data, vocab_size=10, max_tokens=8) == ("r0/ab12", [5, 6], [1, 2, 3])
    bad = {
        b"\x80\x04K\x01.": "not JSON",  # a pickle is never unpickled
        b'{"schema": 2, "source": "x", "context": [], "answer": [1]}': "schema 2",
        b"[1, 2]": "schema 'list'",
        b'{"schema": 1, "context": [], "answer": [1]}': "without a source",
        answer_to_bytes("x", [], [1, 10]): r"outside 0\.\.9",
        answer_to_bytes("x", [-1], [1]): r"outside 0\.\.9",
        b'{"schema": 1, "source": "x", "context": [], "answer": [1.0]}': r"outside 0\.\.9",
        b'{"schema": 1, "source": "x", "context": [], "answer": [true]}': r"outside 0\.\.9",
        b'{"schema": 1, "source": "x", "context": [], "answer": "abc"}': "not a list",
        answer_to_bytes("x", [], [1] * 9): "at most 8",
    }
    for data, message in bad.items():
        with pytest.raises(HistoryError, match=message):
            answer_from_bytes(data, vocab_size=10, max_tokens=8)


def test_history_copies_from_one_earlier_answer_as_far_as_the_match_reaches():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=3, match_ngram=4)
    h.add([50, 51, 52, 53], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    # seen once: the counted chain stays silent, the copy does not
    assert h.chain([0, 1, 2, 3], 5) is None
    assert h.copy([0, 1, 2, 3, 4], 5) == [5, 6, 7, 8]  # 4 tokens agree: a copy of 4
    assert h.copy([53, 1, 2, 3, 4], 5) == [5, 6, 7, 8, 9]  # 5 agree (the prompt's end too): 5
    assert h.copy([51, 52, 53, 1, 2], 3) == [3, 4, 5]  # the answer's first tokens, from its prompt
    assert h.copy([2, 3, 4, 9], 5) is None  # no 4 tokens in a row match
    assert h.copy([7, 8, 9, 10], 5) is None  # nothing followed the end of the answer
    h.add([], [1, 2, 3, 4, 0, 0, 0, 0])
    assert h.copy([9, 1, 2, 3, 4], 4) == [0, 0, 0, 0]  # copies of the same length: the newest wins
    h.add([], [1, 2, 3, 4, 7])
    assert h.copy([9, 1, 2, 3, 4], 4) == [0, 0, 0, 0]  # ... over a newer one whose answer ends sooner


def test_history_copies_from_the_occurrence_whose_match_reaches_furthest_back():
    """A request asked again is copied from its own earlier answer, not from a newer answer that
    shares a phrase with it; but only the last max_candidates occurrences are looked at."""
    from tide.lookup import AnswerHistory

    phrase = [1, 2, 3, 4]
    h = AnswerHistory(max_ngram=3, match_ngram=4, max_candidates=3)
    h.add([80, 81], [20, 21, 22, *phrase, 30, 31, 32])  # the answer asked again below
    h.add([82, 83], [40, 41, *phrase, 50, 51, 52])
    h.add([84], [60, *phrase, 70, 71, 72])
    assert h.copy([21, 22, *phrase], 3) == [30, 31, 32]  # 6 tokens agree against 4 and 4
    assert h.copy([99, 41, *phrase], 2) == [50, 51]  # 5 agree: the middle one
    assert h.copy([99, 98, *phrase], 3) == [70, 71, 72]  # only the phrase agrees: the newest
    h.add([85], [61, *phrase, 73, 74, 75])  # a fourth occurrence pushes the first out of reach
    assert h.copy([21, 22, *phrase], 3) == [73, 74, 75]
    assert AnswerHistory(max_ngram=3, match_ngram=4, max_candidates=4).rebuilt(4).max_candidates == 4


def test_history_copies_are_forgotten_with_their_answers():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=3, match_ngram=3, max_tokens=6)
    h.add([], [1, 2, 3, 4, 5])
    h.add([], [1, 2, 3, 9])  # overwrites (1, 2, 3) -> 4 with -> 9
    h.add([], [6, 7, 8, 5])  # 13 tokens > 6: the first two answers go
    only = AnswerHistory(max_ngram=3, match_ngram=3, max_tokens=6)
    only.add([], [6, 7, 8, 5])
    assert h._last.keys() == only._last.keys() and len(h) == 1
    assert h.copy([1, 2, 3], 2) is None and h.copy([6, 7, 8], 2) == [5]
    assert AnswerHistory(match_ngram=0).copy([1, 2, 3], 2) is None


def test_history_ignores_a_hash_collision():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=3, match_ngram=3)
    h.add([], [1, 2, 3, 4])
    h._last[hash((7, 8, 9))] = h._last[hash((1, 2, 3))]  # (7, 8, 9) pretends to end where (1, 2, 3) does
    assert h.copy([7, 8, 9], 2) is None


def test_history_copies_from_the_first_occurrence_within_an_answer():
    from tide.lookup import AnswerHistory

    h = AnswerHistory(max_ngram=3, match_ngram=3)
    h.add([], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])  # a loop: the last (1, 2, 3) has nothing after it
    assert h.copy([9, 1, 2, 3], 5) == [4, 1, 2]  # three agree: a copy of 3, from the first


def test_a_rebuilt_history_equals_one_built_afresh_with_its_match_length():
    """`tide tune` compares copy match lengths on one seed: rebuilt(n) from a history built with
    the longest must draft what a history built with n from the same answers drafts."""
    from tide.lookup import AnswerHistory

    answers = [([50, 51, 52, 53, 54, 55, 56, 57], [1, 2, 3, 4, 5, 6, 7, 8, 9]),
               ([60, 61, 62, 63, 64, 65, 66, 67], [3, 4, 5, 6, 7, 0, 0, 1, 2, 3, 4]),
               ([70, 71], [1, 2, 3, 4, 5, 6, 9, 9])]
    seed = AnswerHistory(max_ngram=3, match_ngram=8, max_tokens=20, min_count=1)
    for context, ans in answers:
        seed.add(context, ans)
    texts = [[56, 57, 1, 2], [9, 3, 4, 5, 6], [66, 67, 3, 4], [0, 1, 2, 3, 4], [5, 6, 7, 0, 0, 1, 2, 3, 4],
             [63, 64, 65, 66, 67, 3, 4, 5, 6]]
    for n in (0, 2, 4, 6, 8):
        fresh = AnswerHistory(max_ngram=3, match_ngram=n, max_tokens=20, min_count=1)
        for context, ans in answers:
            fresh.add(context, ans)
        again = seed.rebuilt(n)
        assert (again.match_ngram, again.tokens, len(again), again._next) == (n, fresh.tokens, len(fresh), fresh._next)
        assert [again.copy(t, 6) for t in texts] == [fresh.copy(t, 6) for t in texts]
        assert any(fresh.copy(t, 6) for t in texts) == bool(n)  # the comparison saw copies
        assert [again.chain(t, 6) for t in texts] == [fresh.chain(t, 6) for t in texts]
    assert len(seed) == 2  # the cap (20 tokens) dropped the first answer; rebuilt ones hold the same two
    assert seed.rebuilt(4).copy([1, 2, 3, 4], 3) == [5, 6, 9]  # the newest answer with (1, 2, 3, 4)
