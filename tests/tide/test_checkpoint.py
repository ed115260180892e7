import pytest
import torch

from tests.conftest import tiny_target
from tide.checkpoint import (
    WeightError,
    load_draft,
    new_head,
    save_draft,
    state_from_bytes,
    state_to_bytes,
    swap_in_place,
)
from tide.draft_head import DraftHead


def test_trainer_head_loads_into_serving_head_strict(tmp_path):
    target = tiny_target()
    trained = new_head(target, 32).float()  # the trainer keeps fp32 master weights
    with torch.no_grad():
        trained.fc.weight.add_(1.0)
    serving = DraftHead(trained.config)
    serving.load_state_dict(trained.state_dict(), strict=True)
    assert torch.equal(serving.fc.weight, trained.fc.weight)
    save_draft(trained, tmp_path / "ck", version=7, target=target)
    head, version = load_draft(tmp_path / "ck", target)
    assert version == 7 and torch.equal(head.fc.weight, trained.fc.weight)
    assert torch.equal(head.d2t, trained.d2t)


def test_load_rejects_other_target_and_corrupt_files(tmp_path):
    target = tiny_target()
    save_draft(new_head(target, 32), tmp_path / "ck", version=1, target=target)
    with pytest.raises(WeightError, match="another target"):
        load_draft(tmp_path / "ck", tiny_target(hidden=32))
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightError):
        load_draft(tmp_path / "ck", target)
    with pytest.raises(WeightError, match="not a tide draft checkpoint"):
        load_draft(tmp_path / "missing", target)


def _bad(state, name, fn):
    state = dict(state)
    state[name] = fn(state[name])
    return state


@pytest.mark.parametrize("mutate, message", [
    (lambda s: {k: v for k, v in s.items() if k != "fc.weight"}, "missing"),
    (lambda s: {**s, "extra.weight": torch.zeros(1)}, "unexpected"),
    (lambda s: _bad(s, "fc.weight", lambda t: t[:, :-1]), "shape"),
    (lambda s: _bad(s, "norm.weight", lambda t: t.clone().fill_(float("nan"))), "NaN"),
    (lambda s: _bad(s, "d2t", lambda t: t.float()), "dtype"),
    (lambda s: _bad(s, "d2t", lambda t: t + 1000), "vocabulary"),
])
def test_rejected_update_leaves_old_weights_serving(mutate, message):
    target = tiny_target()
    head = new_head(target, 32)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    update = state_from_bytes(state_to_bytes(new_head(target, 32, seed=5)))
    for k in update:
        if k not in ("d2t", "t2d") and update[k].is_floating_point():
            update[k] = update[k] + 0.5
    with pytest.raises(WeightError, match=message):
        swap_in_place(head, mutate(update))
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    swap_in_place(head, update)  # the valid update applies whole
    assert torch.equal(head.fc.weight, update["fc.weight"].to(head.fc.weight.dtype))


def test_garbage_bytes_are_not_weights():
    with pytest.raises(WeightError):
        state_from_bytes(b"\x00" * 64)
