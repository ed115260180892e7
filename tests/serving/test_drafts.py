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
