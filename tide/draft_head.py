"""The EAGLE-3 draft head: one decoder layer that reads the target's own hidden states.

    features (low, mid, high target layers) --fc--> g_t          (B, T, 3H) -> (B, T, H)
    [input_layernorm(embed(x_{t+1})), hidden_norm(g_t)] --midlayer--> h_t   (B, T, 2H) -> (B, T, H)
    lm_head(norm(h_t)) -> logits over the reduced draft vocabulary          (B, T, Vd)

For the next draft step, h_t takes the place of g_t (the draft feeds on its own output).
Draft token d maps to target token d + d2t[d]; t2d marks the target tokens that have a draft id.
Parameter names follow the public EAGLE-3 checkpoints (`fc`, `midlayer.*`, `norm`, `lm_head`,
`d2t`, `t2d`); the token embeddings are the target's, frozen and never saved with the head.
This module maps tensors to tensors and does no I/O (checkpoints live in tide/checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tide import kernels


@dataclass
class DraftHeadConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    draft_vocab_size: int
    target_vocab_size: int

    @classmethod
    def from_target(cls, config, draft_vocab_size: int) -> DraftHeadConfig:
        """Shapes mirror the target's decoder layers (HF config of a llama/qwen-like model)."""
        rope = getattr(config, "rope_parameters", None) or {}
        heads = config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", heads),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            draft_vocab_size=min(draft_vocab_size, config.vocab_size),
            target_vocab_size=config.vocab_size,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (llama's rotate-half convention). x: (B, h, T, d), positions: (T,), or
    (B, T) where each row has its own (a batch of requests)."""
    freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (T, d/2) or (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    if positions.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DraftCache:
    """The draft's own KV cache: keys/values (B, n_kv, S, d) of entries already attended to."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def crop(self, length: int) -> None:
        """Keep the first `length` entries (roll back rejected draft positions)."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


class DraftAttention(nn.Module):
    def __init__(self, c: DraftHeadConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, positions, cache=None, ttt_base=None, ttt_diag=(), attn_mask=None):
        """x: (B, T, 2H). Returns the output (B, T, H) and this call's (k, v), each (B, nkv, T, d).

        Inference: attend causally over `cache` plus the new entries, or as `attn_mask` (T, S)
        says (True: attend; S counts the cache with the new entries: a draft tree's nodes); a
        batch of requests passes (B, 1, T, S), one mask per row, and positions (B, T).
        Training-time test: `ttt_base` holds step-0 (k, v) of the whole window; query i of an
        unrolled step attends to base keys <= i plus, per earlier unrolled step, its own entry i
        (`ttt_diag`): exactly what a drafted token sees at inference.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, d)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, d)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        rep = self.nh // self.nkv
        if ttt_base is None:
            k_all, v_all = cache.append(k, v) if cache is not None else (k, v)
            S = k_all.shape[2]
            ext = getattr(self.q_proj, "bf16_ext", None)  # tide.kernels where the target uses it
            if ext is not None and kernels.attention_fits(q, k_all, v_all):
                m = attn_mask[:, 0] if attn_mask is not None and attn_mask.dim() == 4 else attn_mask
                m = torch.empty(0) if m is None else m.expand(B, T, S).contiguous()
                out = ext.bf16_attention(q.contiguous(), k_all.contiguous(), v_all.contiguous(), m, self.hd**-0.5)
                return self.o_proj(out.reshape(B, T, self.nh * self.hd)), (k, v)
            mask = attn_mask
            if mask is None and T > 1:  # query t sees keys up to S - T + t
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            out = F.scaled_dot_product_attention(
                q, k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1), attn_mask=mask)
        else:
            out = self._ttt_attention(q, ttt_base, [*ttt_diag, (k, v)], rep)
        out = out.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(out), (k, v)

    @staticmethod
    def _ttt_attention(q, base, diag, rep):
        scale = 1.0 / math.sqrt(q.shape[-1])
        k0, v0 = (t.repeat_interleave(rep, 1) for t in base)
        T = q.shape[2]
        scores = [torch.matmul(q, k0.transpose(-1, -2)) * scale]  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores[0] = scores[0].masked_fill(~causal, float("-inf"))
        diag = [(k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) for k, v in diag]
        scores += [(q * k).sum(-1, keepdim=True) * scale for k, _ in diag]  # (B, nh, T, 1) each
        w = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.matmul(w[..., :T], v0)
        for i, (_, v) in enumerate(diag):
            out = out + w[..., T + i : T + i + 1] * v
        return out


class DraftMLP(nn.Module):
    def __init__(self, c: DraftHeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    def __init__(self, c: DraftHeadConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DraftAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DraftMLP(c)

    def forward(self, hidden, embeds, positions, cache=None, ttt_base=None, ttt_diag=(), attn_mask=None):
        residual = hidden
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)  # (B,T,2H)
        attn, kv = self.self_attn(x, positions, cache, ttt_base, ttt_diag, attn_mask)
        hidden = residual + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, kv


class DraftHead(nn.Module):
    """One class for the trainer and the server alike."""

    def __init__(self, config: DraftHeadConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(3 * H, H, bias=False)
        self.midlayer = DraftDecoderLayer(config)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.target_vocab_size, dtype=torch.bool))

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, 3H) target features -> (B, T, H) draft input hidden."""
        return self.fc(features)

    def forward(self, hidden, embeds, positions, cache=None, ttt_base=None, ttt_diag=(), attn_mask=None):
        """hidden, embeds: (B, T, H); positions: (T,) or (B, T). Returns (B, T, H) and this
        call's (k, v)."""
        return self.midlayer(hidden, embeds, positions, cache, ttt_base, ttt_diag, attn_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T, Vd) over the draft vocabulary."""
        return self.lm_head(self.norm(hidden))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    @property
    def target_ids(self) -> torch.Tensor:
        """(Vd,) the target token id of every draft token."""
        return self.to_target_ids(torch.arange(self.config.draft_vocab_size, device=self.d2t.device))

    @torch.no_grad()
    def set_vocab(self, draft_to_target: torch.Tensor) -> None:
        """Install the reduced vocabulary: draft id d stands for target id draft_to_target[d]."""
        ids = draft_to_target.to(torch.long)
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True

    @torch.no_grad()
    def init_from_target(self, lm_head_weight: torch.Tensor, final_norm_weight: torch.Tensor) -> None:
        """Start in the target's own output space: fc passes the high-layer features through, the
        layer's residual branches start at zero, and the LM head and norm are the target's. An
        untrained head then drafts what the target's upper layers already lean towards."""
        H = self.config.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, 2 * H :].copy_(torch.eye(H))
        self.midlayer.self_attn.o_proj.weight.zero_()
        self.midlayer.mlp.down_proj.weight.zero_()
        self.lm_head.weight.copy_(lm_head_weight[self.target_ids].to(self.lm_head.weight.dtype))
        self.norm.weight.copy_(final_norm_weight.to(self.norm.weight.dtype))


def build_draft_vocab(token_counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target tokens, ascending by id (ties: the lower id, which in BPE
    vocabularies is the earlier, more frequent merge). token_counts: (V,)."""
    order = torch.sort(-token_counts.to(torch.long), stable=True).indices[:size]
    return order.sort().values
