import pytest
import torch

from tide.records import SCHEMA_VERSION, HiddenStateRecord, RecordError


def _record(T=7, H=4):
    return HiddenStateRecord(request_id="r1", target_model_id="tiny", draft_version=3,
                             input_ids=torch.arange(T + 1), features=torch.randn(T, 3 * H).bfloat16(),
                             final_hidden=torch.randn(T, H).bfloat16(), prompt_len=3)


def test_round_trip_keeps_tensors_and_header():
    r = _record()
    data = r.to_bytes()
    assert isinstance(data, bytes) and b"pickle" not in data
    back = HiddenStateRecord.from_bytes(data)
    assert back.header() == r.header()
    assert back.header()["schema_version"] == SCHEMA_VERSION
    assert torch.equal(back.features, r.features) and back.features.dtype == torch.bfloat16
    assert torch.equal(back.input_ids, r.input_ids) and torch.equal(back.final_hidden, r.final_hidden)


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"])
def test_corrupt_bytes_are_rejected(data):
    with pytest.raises(RecordError):
        HiddenStateRecord.from_bytes(data)


def test_schema_mismatch_is_rejected():
    data = _record().to_bytes().replace(b'\\"schema_version\\": 1', b'\\"schema_version\\": 9')
    with pytest.raises(RecordError, match="schema"):
        HiddenStateRecord.from_bytes(data)


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(RecordError):
        HiddenStateRecord(request_id="x", target_model_id="t", draft_version=0, input_ids=torch.arange(5),
                          features=torch.zeros(5, 12), final_hidden=torch.zeros(5, 4), prompt_len=1)
