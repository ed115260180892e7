"""tide's one native kernel: few-row products with bf16 weights on CPUs without bf16 units.

On AVX2 CPUs without AVX-512 (most desktop and many cloud x86 parts), torch's bf16 matmul
converts and multiplies one input row at a time, so a verify pass of k tokens costs about k
single-token steps and speculation in bf16 cannot pay (measured: 0.79x on a 2-core EPYC).
`bf16_gemm.cpp` converts each block of weight rows to fp32 once and multiplies all input rows
against it, so the weights stream from memory once per pass. It is built on first use with
torch's extension builder (gcc and ninja; ~30 s, cached under ~/.cache/torch_extensions) and
used only where torch has no fast bf16 path; where it cannot be built, the stock path runs.
"""

from __future__ import annotations

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


def needs_bf16_kernel() -> bool:
    """True on x86 CPUs with AVX2 but no AVX-512: there torch's bf16 matmul runs row by row."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        return False  # AVX-512 CPUs: oneDNN's bf16 path is fast
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_kernel():
    """The compiled extension (with `bf16_linear(x_fp32, w_bf16)`), or None where unusable."""
    global _ext, _tried
    with _lock:
        if _tried:
            return _ext
        _tried = True
        if not needs_bf16_kernel():
            return None
        try:
            import ninja
            from torch.utils.cpp_extension import load

            # the venv's ninja is not on PATH unless the venv is activated
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            log.info("loading tide's AVX2 bf16 kernel (built on first use: ~30-60 s)")
            _ext = load(name="tide_bf16_gemm", sources=[str(Path(__file__).with_name("bf16_gemm.cpp"))],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],  # OpenMP: torch's threads
                        extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the stock path
            log.warning("AVX2 bf16 kernel unavailable (%s: %s); bf16 verify passes use torch's "
                        "row-by-row path", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _ext = None
        return _ext
