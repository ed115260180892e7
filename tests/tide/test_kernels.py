"""The AVX2 bf16 kernel: same products as fp32 arithmetic on the bf16 weights, any shape."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tide.kernels as kernels
from tide.models import SkinnyLinear, use_skinny_matmul

needs_kernel = pytest.mark.skipif(not kernels.needs_bf16_kernel(),
                                  reason="the kernel is only used on x86 CPUs with AVX2 and no AVX-512")


@pytest.fixture(scope="module")
def ext():
    ext = kernels.bf16_kernel()
    assert ext is not None, "the kernel failed to build on a CPU that needs it (see the log)"
    return ext


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 17, 64, 65, 130])
@pytest.mark.parametrize("n,k", [(1, 8), (3, 16), (4, 576), (5, 24), (13, 1536), (64, 40)])
def test_bf16_linear_matches_fp32_product(ext, m, n, k):
    torch.manual_seed(m * 1000 + n)
    x = torch.randn(m, k)
    w = torch.randn(n, k).bfloat16()
    got = ext.bf16_linear(x, w)
    want = x.double() @ w.double().t()  # the bf16 weights are exact in fp32 and fp64
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * k ** 0.5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, 20, 21, 64, 65])
def test_bf16_inputs_give_the_fp32_sums_rounded_to_bf16(ext, m):
    torch.manual_seed(m)
    x = (torch.randn(m, 576) * torch.logspace(-3, 3, 576)).bfloat16()
    w = torch.randn(1001, 576).bfloat16()
    got = ext.bf16_linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 1001)
    want = ext.bf16_linear(x.float(), w).to(torch.bfloat16)  # torch's rounding of the same sums
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@needs_kernel
def test_bf16_outputs_keep_nan_and_inf(ext):
    w = torch.eye(8).bfloat16()
    x = torch.tensor([[float("nan"), 0, 0, 0, 0, 0, 0, 0], [float("inf"), 0, 0, 0, 0, 0, 0, 0]])
    got = ext.bf16_linear(x.bfloat16(), w).float()
    assert got[0].isnan().all()  # nan * 0 is nan in every column
    assert got[1, 0] == float("inf") and got[1, 1:].isnan().all()


@needs_kernel
def test_a_row_gets_the_same_bits_whatever_the_number_of_rows(ext):
    # single steps and verify passes then round alike: both paths sum each row in the same order
    torch.manual_seed(0)
    x = torch.randn(70, 576).bfloat16()
    w = torch.randn(300, 576).bfloat16()
    alone = torch.cat([ext.bf16_linear(x[i:i + 1].contiguous(), w) for i in range(70)])
    for m in (2, 4, 5, 17, 20, 21, 64, 70):
        assert torch.equal(ext.bf16_linear(x[:m].contiguous(), w), alone[:m]), m


@needs_kernel
def test_bf16_linear_rejects_bad_shapes_and_dtypes(ext):
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.bf16_linear(torch.randn(2, 12), torch.randn(4, 12).bfloat16())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.bf16_linear(torch.randn(2, 16).half(), torch.randn(4, 16).bfloat16())
    with pytest.raises(RuntimeError, match="w bfloat16"):
        ext.bf16_linear(torch.randn(2, 16), torch.randn(4, 16))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.bf16_linear(torch.randn(16, 2).t(), torch.randn(4, 16).bfloat16())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 4, 17, 200])
def test_skinny_linear_bf16_agrees_with_stock_to_bf16_rounding(ext, rows):
    torch.manual_seed(rows)
    layer = nn.Linear(64, 96, bias=True).bfloat16().requires_grad_(False)
    fast = use_skinny_matmul(nn.Sequential(nn.Linear(64, 96, bias=True).bfloat16()))[0].requires_grad_(False)
    fast.load_state_dict(layer.state_dict())
    assert type(fast) is SkinnyLinear and SkinnyLinear.bf16_ext is not None
    x = torch.randn(1, rows, 64).bfloat16()
    got, stock = fast(x), layer(x)
    want = (x.double() @ layer.weight.double().t() + layer.bias.double()).float()
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows, 96)
    # both round an fp32 sum to bf16 (8 bits): each within a bf16 step of the exact product
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=2 ** -7)
    torch.testing.assert_close(stock.float(), want, atol=0.05, rtol=2 ** -7)


@needs_kernel
def test_skinny_linear_bf16_leaves_other_devices_to_torch(ext):
    layer = use_skinny_matmul(nn.Sequential(nn.Linear(16, 8).bfloat16()))[0].requires_grad_(False)
    x = torch.randn(3, 16).bfloat16().to("meta")  # stands in for a GPU tensor: the kernel reads host memory
    assert layer.to("meta")(x).device.type == "meta"


def test_a_kernel_that_cannot_be_built_leaves_the_stock_path(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'tide_bf16_gemm'\ncompiler output")

    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "needs_bf16_kernel", lambda: True)
    monkeypatch.setattr(cpp, "load", fail)
    with caplog.at_level(logging.WARNING, logger="tide.kernels"):
        assert kernels.bf16_kernel() is None
    assert "kernel unavailable (RuntimeError: Error building extension" in caplog.text
    monkeypatch.setattr(SkinnyLinear, "bf16_ext", None)
    layer = use_skinny_matmul(nn.Sequential(nn.Linear(16, 8).bfloat16()))[0].requires_grad_(False)
    x = torch.randn(3, 16).bfloat16()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
