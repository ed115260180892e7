"""The run folder's kept drafts: saved atomically, pruned, resumed only for the same setup."""

import json

from serving.drafts import DraftStore
from tests.conftest import tiny_target
from tide.checkpoint import new_head, state_to_bytes


def test_keeps_the_newest_and_resumes_only_what_fits(tmp_path):
    store = DraftStore(tmp_path / "drafts", keep=2)
    data = state_to_bytes(new_head(tiny_target(), 64))
    for v in (3, 5, 9):
        store.save(v, data, {"version": v, "hmac": "x", "model_source": "m", "draft_path": None})
    assert store.versions() == [5, 9]
    assert "hmac" not in json.loads((tmp_path / "drafts" / "v9.json").read_text())  # signed again when published
    version, got, meta = store.newest("m", None)
    assert version == 9 and got == data and meta["version"] == 9
    assert store.newest("another-model", None) is None  # trained for something else: not resumed
    assert store.newest("m", "runs/other-draft") is None
    (tmp_path / "drafts" / "v9.safetensors").write_bytes(b"truncated")  # a corrupt file is skipped
    assert store.newest("m", None)[0] == 5
    assert DraftStore(tmp_path / "none").newest("m", None) is None


def test_resumes_onto_a_channel_that_has_nothing_newer_and_keeps_what_is_published(tmp_path):
    from tide.transport.memory import MemoryWeightChannel

    store = DraftStore(tmp_path / "drafts", keep=3)
    data = state_to_bytes(new_head(tiny_target(), 64))
    channel = MemoryWeightChannel()
    assert store.resume(channel, "m", None) == 0 and channel.latest_version() == 0  # nothing kept
    channel.publish(4, data, {"version": 4})
    assert store.keep_newest(channel, 0, model="m", draft_path=None) == 4
    assert store.keep_newest(channel, 4, model="m", draft_path=None) == 4  # nothing new: no write
    fresh = MemoryWeightChannel()  # Redis restarted empty: the kept draft goes back
    assert store.resume(fresh, "m", None) == 4 and fresh.fetch(4)[0] == data
    newer = MemoryWeightChannel()
    newer.publish(9, data, {})
    assert store.resume(newer, "m", None) == 4 and newer.latest_version() == 9  # never rolled back
