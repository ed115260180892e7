import pytest
import torch
from torch import nn

from tests.conftest import tiny_target
from tide import kernels
from tide.models import SkinnyLinear, use_skinny_matmul


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_linear(rows, bias):
    torch.manual_seed(rows)
    ref = nn.Linear(24, 40, bias=bias)
    skinny = nn.Linear(24, 40, bias=bias)
    skinny.load_state_dict(ref.state_dict())
    skinny.__class__ = SkinnyLinear
    x = torch.randn(1, rows, 24)
    with torch.no_grad():  # with autograd the stock path runs
        torch.testing.assert_close(skinny(x), ref(x), atol=1e-5, rtol=1e-5)
        assert skinny(x).shape == (1, rows, 40)


def test_skinny_linear_keeps_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    layer.__class__ = SkinnyLinear
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(3, 16).detach())


def test_use_skinny_matmul_keeps_parameters_ties_and_outputs():
    target = tiny_target()
    model = target.model
    ids = torch.randint(1, 90, (1, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    keys = set(model.state_dict())
    use_skinny_matmul(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is SkinnyLinear for m in linears)
    assert set(model.state_dict()) == keys
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the tie survives
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not kernels.can_run(), reason="the kernel needs an x86 CPU with AVX2")
def test_a_head_on_the_kernels_deep_copies_and_pickles():
    """The online trainer deep-copies its head (the eval gate's copy of what serves). A head on
    tide.kernels once held the extension module itself, which cannot be copied, and the default
    `make up` crashed; the copy takes the kernels too and computes the same bits."""
    import copy
    import pickle

    from tide.checkpoint import new_head

    ext = kernels.bf16_kernel("always")
    head = use_skinny_matmul(new_head(tiny_target(hidden=128), 32, seed=0).bfloat16().eval(), "always")
    twin, thawed = copy.deepcopy(head), pickle.loads(pickle.dumps(head))
    for h in (twin, thawed):
        assert h.midlayer.self_attn.q_proj.bf16_ext is ext
    x = torch.randn(1, 3, 128).bfloat16()
    with torch.no_grad():
        want = head.fc(torch.cat([x, x, x], -1))
        for h in (twin, thawed):
            assert torch.equal(h.fc(torch.cat([x, x, x], -1)).view(torch.int16), want.view(torch.int16))
