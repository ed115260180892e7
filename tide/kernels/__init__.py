"""tide's one native extension: bf16 products and attention on x86 CPUs with AVX2+FMA.

On AVX2 CPUs without AVX-512 (most desktop and many cloud x86 parts), torch's bf16 matmul
converts and multiplies one input row at a time, so a verify pass of k tokens costs about k
single-token steps and speculation in bf16 cannot pay (measured: 0.79x on a 2-core EPYC).
`bf16_gemm.cpp` streams the weights once per call and multiplies all input rows against them
(`bf16_linear`), and computes attention one query row at a time from the keys it sees
(`bf16_attention`). Both give a row the same bits whatever else is in the pass, which torch's
bf16 kernels do not: with them bf16 speculation emits exactly the bf16 target's tokens.
On CPUs with AVX512-BF16 the products take `bf16_linear_dp` instead (vdpbf16ps: 32 bf16
products per instruction, the same row stability, other bits than the AVX2 path's, so a process
uses one of the two for all its products).

`model.bf16_kernel` chooses where it runs: `auto` every pass where torch has no fast bf16 path
(AVX2 without bf16 units), passes of up to DP_ROWS rows on AVX512-BF16 CPUs without AMX (there
torch's path is slower up to ~128 rows and faster for wide prefills); `always` every pass on any
AVX2 CPU (exact bf16 whatever the pass width); `never`. It is built on first use with torch's extension
builder (gcc and ninja; ~30 s, cached under ~/.cache/torch_extensions); where it cannot be built,
the stock path runs.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_ext = None
_tried = False


def can_run() -> bool:
    """x86 with AVX2 and FMA (torch's AVX2 or AVX-512 build of its CPU kernels)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def needs_bf16_kernel() -> bool:
    """True on x86 CPUs with AVX2 but no AVX-512: there torch's bf16 matmul runs row by row."""
    if not can_run() or torch.backends.cpu.get_cpu_capability() != "AVX2":
        return False  # AVX-512 CPUs: oneDNN's bf16 path is fast
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


ALL_ROWS = 1 << 30
# On CPUs with AVX512-BF16 but no AMX (AMD Zen 4/5, Intel Cooper Lake), torch's bf16 products of
# a few rows run well below the memory bandwidth, and the vdpbf16ps path beats them up to ~128
# rows: on a 2-core Zen 5 EPYC the model's 211 products (interleaved, median of 6) took 6.7 / 7.3
# / 8.0 / 12.0 / 22.9 / 44.9 ms for passes of 1 / 8 / 17 / 32 / 64 / 128 rows on it and 12.9 /
# 14.2 / 16.7 / 22.0 / 30.8 / 47.7 with torch's, but 200 rows 79.4 against 69.0. So `auto` gives
# the kernel the passes of up to this many rows there (every verify pass and tree; long prefills
# go to torch's bf16 units, the same way for speculation and the target alone).
DP_ROWS = 128


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def dp_pays() -> bool:
    """Whether the vdpbf16ps path beats torch's bf16 up to DP_ROWS rows: AVX512-BF16 without AMX
    (measured on Zen 5; AMX CPUs are not measured and keep torch's)."""
    flags = cpu_flags()
    return can_run() and "avx512_bf16" in flags and "amx_bf16" not in flags


def dp_path() -> bool:
    """Whether the kernel's products take the vdpbf16ps path (`bf16_linear_dp`): CPUs with
    AVX512-BF16. Its bits differ from the AVX2 path's, so all of a process's products take one."""
    return can_run() and "avx512_bf16" in cpu_flags()


def kernel_rows(mode: str = "auto") -> int:
    """`model.bf16_kernel`: how many rows a pass may have for the kernel to take it (0: none).
    always: every pass on any AVX2 CPU; auto: every pass where torch's bf16 is slow (AVX2 without
    bf16 units), passes of up to DP_ROWS rows on AVX512-BF16 CPUs without AMX, none elsewhere;
    never: none."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"bf16_kernel mode must be auto, always or never, not {mode!r}")
    if mode == "always":
        return ALL_ROWS if can_run() else 0
    if mode == "auto":
        return ALL_ROWS if needs_bf16_kernel() else DP_ROWS if dp_pays() else 0
    return 0


def wanted(mode: str = "auto") -> bool:
    """Whether `model.bf16_kernel` wants the kernel for any pass on this CPU."""
    return kernel_rows(mode) > 0


def built():
    """The extension if an earlier `bf16_kernel` call built it, else None."""
    return _ext


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool = False) -> bool:
    """Whether `bf16_attention` takes these (B, H, n, D) queries and (B, Hkv, T, D) keys/values:
    the extension built, bf16 host tensors, no autograd, a head dim it covers, n <= T (packed
    queries, `bf16_attention_rows`, from several rows: any n)."""
    D = q.shape[-1]
    return (_ext is not None and q.device.type == "cpu" and not torch.is_grad_enabled()
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and D % 8 == 0 and D <= 256
            and (packed or q.shape[2] <= k.shape[2]))


def bf16_kernel(mode: str = "auto"):
    """The compiled extension (`bf16_linear`, `bf16_linear_dp`, `bf16_attention`) where `mode`
    wants it and it builds, else None."""
    global _ext, _tried
    if not wanted(mode):
        return None
    with _lock:
        if _tried:
            return _ext
        _tried = True
        try:
            import ninja
            from torch.utils.cpp_extension import load

            # the venv's ninja is not on PATH unless the venv is activated
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            log.info("loading tide's bf16 kernels (built on first use: ~30-60 s)")
            _ext = load(name="tide_bf16_gemm", sources=[str(Path(__file__).with_name("bf16_gemm.cpp"))],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],  # OpenMP: torch's threads
                        extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the stock path
            log.warning("AVX2 bf16 kernel unavailable (%s: %s); bf16 verify passes use torch's "
                        "row-by-row path", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _ext = None
        return _ext
