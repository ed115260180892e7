"""The serving engine without Ray or Redis: what a replica learns from the requests it serves."""

from serving.engine import Cancelled, ServingEngine
from tests.conftest import tiny_target
from tide.checkpoint import new_head
from tide.config import load_config
from tide.speculative import target_generate


def test_a_served_answer_drafts_the_next_requests_and_a_cancelled_one_is_not_learned():
    cfg = load_config(overrides=["decode.k=2", "decode.history_k=6", "decode.max_new_tokens=24",
                                 "serving.capture=false"])
    target = tiny_target()
    engine = ServingEngine(cfg, "r0", target, new_head(target, 64), 0)
    params = engine.decode_params()

    def cancel(_tokens):
        engine.cancel("gone")

    try:
        engine.generate([7, 8, 9], params, request_id="gone", on_tokens=cancel)
    except Cancelled:
        pass
    assert len(engine.history) == 0  # a cancelled request teaches nothing
    first = engine.generate([1, 2, 3], params)
    assert engine.stats_["history_passes"] == 0 and len(engine.history) == 1
    again = engine.generate([1, 2, 3], params)
    assert again["tokens"] == first["tokens"] == target_generate(target, [1, 2, 3], params).tokens
    assert engine.stats_["history_passes"] > 0 and engine.stats_["history_accepted"] > 0
    assert again["verify_passes"] < first["verify_passes"]  # the history's chains were right
