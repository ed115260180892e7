"""tide.kernels: same products as fp32 arithmetic on the bf16 weights (AVX2 and vdpbf16ps paths), any shape."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tide.kernels as kernels
from tide.models import SkinnyLinear, use_skinny_matmul

needs_kernel = pytest.mark.skipif(not kernels.can_run(), reason="the kernel needs an x86 CPU with AVX2")
needs_dp = pytest.mark.skipif(not (kernels.can_run() and "avx512_bf16" in kernels.cpu_flags()),
                              reason="the vdpbf16ps path needs a CPU with AVX512-BF16")


@pytest.fixture(scope="module")
def ext():
    ext = kernels.bf16_kernel("always")
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
@pytest.mark.parametrize("n,k", [(300, 576), (301, 40), (7, 1536)])
@pytest.mark.parametrize("path", ["bf16_linear", pytest.param("bf16_linear_dp", marks=needs_dp)])
def test_a_row_gets_the_same_bits_whatever_the_number_of_rows(ext, path, n, k):
    # single steps and verify passes then round alike: each path sums every row in one order
    fn = getattr(ext, path)
    torch.manual_seed(n)
    x = torch.randn(140, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    alone = torch.cat([fn(x[i:i + 1].contiguous(), w) for i in range(140)])
    for m in (2, 4, 5, 6, 7, 12, 17, 20, 21, 33, 64, 65, 70, 140):
        assert torch.equal(fn(x[:m].contiguous(), w), alone[:m]), m


@needs_kernel
def test_dp_path_refuses_what_it_cannot_take(ext):
    w = torch.randn(16, 64).bfloat16()
    with pytest.raises(RuntimeError, match="needs bf16 inputs and a CPU with AVX512-BF16"):
        ext.bf16_linear_dp(torch.randn(2, 64), w)  # fp32 inputs: the AVX2 path's job
    if not ext.dp_bf16():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            ext.bf16_linear_dp(torch.randn(2, 64).bfloat16(), w)


@needs_dp
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 17, 64, 65, 130])
@pytest.mark.parametrize("n,k", [(1, 8), (3, 16), (4, 576), (5, 24), (13, 1536), (64, 40)])
def test_dp_path_gives_the_product_rounded_to_bf16(ext, m, n, k):
    """AVX512-BF16 CPUs: bf16 inputs are multiplied with vdpbf16ps (pairs summed into fp32
    lanes), K in steps of 32 with masked tails; each output within a bf16 rounding of the exact
    product."""
    assert ext.dp_bf16()
    torch.manual_seed(m * 1000 + n)
    x = torch.randn(m, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    got = ext.bf16_linear_dp(x, w)
    want = x.double() @ w.double().t()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * k ** 0.5, rtol=2 ** -8)


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
    fast = use_skinny_matmul(nn.Sequential(nn.Linear(64, 96, bias=True).bfloat16()), "always")[0]
    fast.requires_grad_(False).load_state_dict(layer.state_dict())
    assert type(fast) is SkinnyLinear and fast.bf16_ext is ext
    x = torch.randn(1, rows, 64).bfloat16()
    got, stock = fast(x), layer(x)
    want = (x.double() @ layer.weight.double().t() + layer.bias.double()).float()
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows, 96)
    # both round an fp32 sum to bf16 (8 bits): each within a bf16 step of the exact product
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=2 ** -7)
    torch.testing.assert_close(stock.float(), want, atol=0.05, rtol=2 ** -7)


@needs_kernel
def test_skinny_linear_takes_the_dp_path_where_the_cpu_has_avx512_bf16(ext, monkeypatch):
    """bf16 inputs take bf16_linear_dp on AVX512-BF16 CPUs (a pass of 17 rows gives each row
    its one-row bits), fp32 inputs the AVX2 path; elsewhere every input takes the AVX2 path."""
    torch.manual_seed(0)
    x = torch.randn(17, 576).bfloat16()
    fast = use_skinny_matmul(nn.Sequential(nn.Linear(576, 300, bias=False).bfloat16()), "always")[0]
    fast.requires_grad_(False)
    assert fast.bf16_dp == kernels.dp_path()
    got = fast(x)
    want = (ext.bf16_linear_dp if fast.bf16_dp else ext.bf16_linear)(x, fast.weight)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    rows = torch.cat([fast(x[i:i + 1]) for i in range(17)])
    assert torch.equal(rows.view(torch.int16), got.view(torch.int16))
    assert torch.equal(fast(x.float()), ext.bf16_linear(x.float(), fast.weight))
    monkeypatch.setattr(kernels, "dp_path", lambda: False)
    assert not use_skinny_matmul(nn.Sequential(nn.Linear(16, 8).bfloat16()), "always")[0].bf16_dp


@needs_kernel
def test_skinny_linear_bf16_leaves_other_devices_to_torch(ext):
    layer = use_skinny_matmul(nn.Sequential(nn.Linear(16, 8).bfloat16()), "always")[0].requires_grad_(False)
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
    layer = use_skinny_matmul(nn.Sequential(nn.Linear(16, 8).bfloat16()))[0].requires_grad_(False)
    assert layer.bf16_ext is None
    x = torch.randn(3, 16).bfloat16()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def _attention_ref(q, k, v, allowed, scale):
    """fp64 softmax(q k^T * scale) v over the allowed keys, grouped queries."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, n, H, D)


def _kv(b=1, hkv=3, t=40, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hkv, t, d, generator=g).bfloat16(), torch.randn(b, hkv, t, d, generator=g).bfloat16())


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 4, 17, 40])
@pytest.mark.parametrize("d", [64, 128])
def test_bf16_attention_matches_softmax_attention(ext, n, d):
    k, v = _kv(t=40, d=d)
    q = torch.randn(1, 9, n, d).bfloat16()
    causal = torch.ones(n, 40, dtype=torch.bool).tril(40 - n)  # the last n of 40 positions
    got = ext.bf16_attention(q, k, v, torch.empty(0), d ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n, 9, d)
    torch.testing.assert_close(got.double(), _attention_ref(q, k, v, causal, d ** -0.5), atol=1e-2, rtol=2 ** -7)


@needs_kernel
def test_bf16_attention_takes_bool_and_additive_masks_per_batch_row(ext):
    k, v = _kv(b=2, t=12)
    q = torch.randn(2, 6, 3, 64).bfloat16()
    allowed = torch.rand(2, 3, 12) > 0.4
    allowed[:, :, 0] = True
    allowed[1, 2] = False  # a fully masked row (left padding): zeros, not NaN
    want = _attention_ref(q, k, v, allowed[:, None], 0.125)
    want[1, 2] = 0
    got = ext.bf16_attention(q, k, v, allowed, 0.125)
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=2 ** -7)
    additive = torch.zeros(2, 3, 12).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    assert torch.equal(ext.bf16_attention(q, k, v, additive, 0.125), got)


@needs_kernel
def test_a_query_row_gets_the_same_bits_in_any_pass(ext):
    # a chain: the last token of a pass of n sees what it would see alone in a single step
    k, v = _kv(t=50)
    q = torch.randn(1, 9, 8, 64).bfloat16()
    full = ext.bf16_attention(q, k, v, torch.empty(0), 0.125)
    for i in range(8):
        t = 50 - 8 + i + 1
        alone = ext.bf16_attention(q[:, :, i:i + 1].contiguous(), k[:, :, :t].contiguous(),
                                   v[:, :, :t].contiguous(), torch.empty(0), 0.125)
        assert torch.equal(alone[:, 0], full[:, i]), i
    # a tree node: it sees the prefix and its ancestors spread over the pass, in cache order;
    # alone, with the same keys next to each other, it gets the same bits
    prefix, seen = 30, [30, 33, 37, 41]
    allowed = torch.zeros(1, 1, 50, dtype=torch.bool)
    allowed[..., :prefix] = True
    allowed[..., seen] = True
    node = ext.bf16_attention(q[:, :, :1].contiguous(), k, v, allowed, 0.125)
    keep = list(range(prefix)) + seen
    alone = ext.bf16_attention(q[:, :, :1].contiguous(), k[:, :, keep].contiguous(), v[:, :, keep].contiguous(),
                               torch.empty(0), 0.125)
    assert torch.equal(node, alone)


@needs_kernel
def test_bf16_attention_rejects_bad_inputs(ext):
    k, v = _kv(t=8)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.bf16_attention(torch.randn(1, 3, 1, 64), k, v, torch.empty(0), 0.125)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        ext.bf16_attention(torch.randn(1, 4, 1, 64).bfloat16(), k, v, torch.empty(0), 0.125)
    with pytest.raises(RuntimeError, match="mask must be"):
        ext.bf16_attention(torch.randn(1, 3, 2, 64).bfloat16(), k, v, torch.ones(1, 2, 7, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="more queries than keys"):
        ext.bf16_attention(torch.randn(1, 3, 9, 64).bfloat16(), k, v, torch.empty(0), 0.125)


@needs_kernel
def test_a_llama_on_the_kernel_attention_agrees_with_sdpa_and_falls_back_where_it_must(ext):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tide.models import KERNEL_ATTENTION, use_kernel_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).bfloat16().eval()
    ids = torch.randint(0, 128, (2, 9))
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :3] = 0  # left padding: the mask reaches the kernel as a (B, n, T) bool mask
    with torch.no_grad():
        want = model(ids, attention_mask=pad).logits
        use_kernel_attention(model)
        assert model.config._attn_implementation == KERNEL_ATTENTION
        got = model(ids, attention_mask=pad).logits
        torch.testing.assert_close(got[0].float(), want[0].float(), atol=0.05, rtol=0.02)
        torch.testing.assert_close(got[1, 3:].float(), want[1, 3:].float(), atol=0.05, rtol=0.02)
    grads = model(ids).logits  # grad enabled: SDPA (the kernel has no backward)
    assert grads.requires_grad


@needs_kernel
@pytest.mark.parametrize("h,hkv,n", [(4, 4, 2), (8, 2, 3), (10, 2, 1), (16, 2, 4), (3, 1, 1), (9, 3, 17)])
def test_heads_computed_together_get_the_bits_of_a_head_alone(ext, h, hkv, n):
    # the kernel takes up to 4 heads of a group per task; grouping must not change a head's sums
    k, v = _kv(hkv=hkv, t=30, seed=h)
    q = torch.randn(1, h, n, 64).bfloat16()
    got = ext.bf16_attention(q, k, v, torch.empty(0), 0.125)
    causal = torch.ones(n, 30, dtype=torch.bool).tril(30 - n)
    torch.testing.assert_close(got.double(), _attention_ref(q, k, v, causal, 0.125), atol=1e-2, rtol=2 ** -7)
    g = h // hkv
    for head in range(h):
        alone = ext.bf16_attention(q[:, head:head + 1].contiguous(), k[:, head // g:head // g + 1].contiguous(),
                                   v[:, head // g:head // g + 1].contiguous(), torch.empty(0), 0.125)
        assert torch.equal(alone[:, :, 0], got[:, :, head]), head


@needs_kernel
def test_bf16_attention_takes_one_position_transposed_keys(ext):
    """A draft head fed one position on an empty cache hands the kernel k (1, Hkv, 1, D) from a
    transpose: is_contiguous() ignores the length-1 axis's stride, the kernel must too (it raised)."""
    q = torch.randn(1, 1, 9, 64).bfloat16().transpose(1, 2).contiguous()
    k, v = (torch.randn(1, 1, 3, 64).bfloat16().transpose(1, 2).contiguous() for _ in range(2))
    assert k.stride(2) != k.size(3)
    got = ext.bf16_attention(q, k, v, torch.empty(0), 0.125)
    torch.testing.assert_close(got.double(), _attention_ref(q, k, v, torch.ones(1, 1, dtype=torch.bool), 0.125),
                               atol=1e-2, rtol=2 ** -7)


@needs_kernel
def test_a_bf16_draft_head_attends_on_the_kernel_like_on_sdpa(ext):
    import copy

    from tests.conftest import tiny_target
    from tide.checkpoint import new_head
    from tide.draft_head import DraftCache

    target = tiny_target(hidden=128)  # head dim 32
    stock = new_head(target, 32, token_counts=torch.arange(96).flip(0), seed=0)
    with torch.no_grad():
        for p in stock.midlayer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    stock = stock.to(torch.bfloat16).eval()
    fast = use_skinny_matmul(copy.deepcopy(stock), "always")
    assert fast.midlayer.self_attn.q_proj.bf16_ext is ext
    hidden, embeds = torch.randn(1, 9, 128).bfloat16(), torch.randn(1, 9, 128).bfloat16()
    tree = torch.ones(3, 9, dtype=torch.bool)
    tree[0, 7:], tree[1, 8] = False, False  # nodes that see only their own branch
    with torch.no_grad():
        for mask in (None, tree):
            n = 9 if mask is None else 3
            outs = []
            for head in (stock, fast):
                cache = DraftCache()
                if n < 9:  # the tree's prefix first
                    head(hidden[:, :9 - n], embeds[:, :9 - n], torch.arange(9 - n), cache)
                pos = torch.arange(9 - n, 9)
                outs.append(head(hidden[:, 9 - n:], embeds[:, 9 - n:], pos, cache, attn_mask=mask)[0])
            torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=0.05, rtol=0.02)


def test_auto_gives_the_kernel_passes_up_to_dp_rows_on_bf16_unit_cpus_without_amx(monkeypatch):
    """auto: every pass on AVX2 CPUs without bf16 units, passes of up to DP_ROWS rows with
    AVX512-BF16 and no AMX, none with AMX (not measured); always: every pass; never: none."""
    monkeypatch.setattr(kernels, "can_run", lambda: True)
    cases = [(True, set(), kernels.ALL_ROWS), (False, {"avx512_bf16"}, kernels.DP_ROWS),
             (False, {"avx512_bf16", "amx_bf16"}, 0), (False, set(), 0)]
    for slow_bf16, flags, rows in cases:
        monkeypatch.setattr(kernels, "needs_bf16_kernel", lambda s=slow_bf16: s)
        monkeypatch.setattr(kernels, "cpu_flags", lambda f=flags: f)
        assert kernels.kernel_rows("auto") == rows, flags
        assert kernels.kernel_rows("always") == kernels.ALL_ROWS and kernels.kernel_rows("never") == 0
        assert kernels.wanted("auto") == (rows > 0)
    monkeypatch.setattr(kernels, "can_run", lambda: False)
    assert kernels.kernel_rows("always") == 0
    with pytest.raises(ValueError, match="auto, always or never"):
        kernels.kernel_rows("sometimes")


@needs_kernel
def test_passes_wider_than_the_kernels_rows_take_torchs_path(ext, monkeypatch):
    """bf16_rows / tide_kernel_rows: the linears and the attention give the kernel passes of up
    to that many rows (which then get the bits of a one-row pass), and wider passes to torch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tide.models import use_kernel_attention

    calls = []

    class Spy:
        def bf16_linear(self, x, w):
            calls.append(x.shape[0])
            return ext.bf16_linear(x, w)

        def bf16_linear_dp(self, x, w):
            calls.append(x.shape[0])
            return ext.bf16_linear_dp(x, w)

        def bf16_attention(self, q, *args):
            calls.append(q.shape[2])
            return ext.bf16_attention(q, *args)

    monkeypatch.setattr(kernels, "built", lambda: Spy())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = use_skinny_matmul(LlamaForCausalLM(cfg).bfloat16().eval(), "always")
    for m in model.modules():
        if isinstance(m, SkinnyLinear):
            m.bf16_rows = 4
    use_kernel_attention(model, max_rows=4)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        model(ids)
        assert calls == []  # 9 rows: torch's path throughout
        row = model(ids[:, :1]).logits
        assert calls and set(calls) == {1}
        calls.clear()
        four = model(ids[:, :4]).logits
        assert calls and set(calls) == {4}
    assert torch.equal(row[:, 0], four[:, 0])  # the kernel's rows do not depend on the pass
