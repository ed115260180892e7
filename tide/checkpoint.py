"""Draft weights as files and bytes: create, save, load, validate, swap in place.

A checkpoint folder holds `model.safetensors` (the head's state dict, EAGLE-3 names) and
`config.json` ({"head": DraftHeadConfig, "tide": {version, target_model_id, feature_layers}}).
A weight update is validated whole (keys, shapes, dtypes, finiteness) before any tensor is
copied, so a rejected update leaves the serving head untouched (PEFT's hotswap discipline).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from tide.draft_head import DraftHead, DraftHeadConfig, build_draft_vocab
from tide.errors import TideError
from tide.models import Target, use_skinny_matmul


class WeightError(TideError, ValueError):
    """Draft weights that do not fit the head they are meant for; nothing was changed."""


def new_head(target: Target, vocab_size: int, token_counts: torch.Tensor | None = None,
             seed: int = 0) -> DraftHead:
    """A fresh (untrained) head: random layer, the target's LM head rows and final norm."""
    torch.manual_seed(seed)
    head = DraftHead(DraftHeadConfig.from_target(target.config, vocab_size))
    counts = token_counts if token_counts is not None else torch.zeros(target.config.vocab_size)
    head.set_vocab(build_draft_vocab(counts, head.config.draft_vocab_size))
    head.init_from_target(target.lm_head_weight, target.final_norm_weight)
    return _for_target(head, target)


def save_draft(head: DraftHead, folder: str | Path, version: int, target: Target) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    meta = {"version": version, "target_model_id": target.model_id,
            "feature_layers": list(target.feature_layers)}
    (folder / "config.json").write_text(
        json.dumps({"head": head.config.to_dict(), "tide": meta}, indent=2))
    return folder


def load_draft(folder: str | Path, target: Target) -> tuple[DraftHead, int]:
    """Load a checkpoint for this target. Returns (head, draft version)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "config.json").read_text())
        config = DraftHeadConfig(**meta["head"])
        info = meta["tide"]
        state = load_file(folder / "model.safetensors")
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise WeightError(f"{folder} is not a tide draft checkpoint: {e}") from None
    if tuple(info["feature_layers"]) != tuple(target.feature_layers):
        raise WeightError(
            f"{folder} reads target layers {info['feature_layers']}, the target serves "
            f"{list(target.feature_layers)}: set draft.feature_layers to match")
    expected = DraftHeadConfig.from_target(target.config, config.draft_vocab_size)
    if config != expected:
        raise WeightError(f"{folder} was trained for another target ({info['target_model_id']}): "
                          f"head config {config} does not match {expected}")
    head = DraftHead(config)
    validate_state(head, state)
    head.load_state_dict(state, strict=True)
    return _for_target(head, target), int(info["version"])


def _for_target(head: DraftHead, target: Target) -> DraftHead:
    """The head in the target's dtype, with the same fast few-row products (tree drafts)."""
    head = head.to(target.dtype).eval()
    return use_skinny_matmul(head, target.bf16_kernel) if target.skinny_matmul else head


def state_to_bytes(head: DraftHead) -> bytes:
    return st_save({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                    for k, v in head.state_dict().items()})


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as e:
        raise WeightError(f"weight update is not a safetensors blob: {e}") from None


def validate_state(head: DraftHead, state: dict[str, torch.Tensor]) -> None:
    """Raise WeightError unless `state` replaces every tensor of `head` exactly."""
    own = head.state_dict()
    if set(state) != set(own):
        raise WeightError(f"weight keys differ: missing {sorted(set(own) - set(state))}, "
                          f"unexpected {sorted(set(state) - set(own))}")
    for name, ref in own.items():
        new = state[name]
        if new.shape != ref.shape:
            raise WeightError(f"{name}: shape {tuple(new.shape)} != {tuple(ref.shape)}")
        if new.is_floating_point() != ref.is_floating_point() or (
                not ref.is_floating_point() and new.dtype != ref.dtype):
            raise WeightError(f"{name}: dtype {new.dtype} does not fit {ref.dtype}")
        if new.is_floating_point() and not torch.isfinite(new).all():
            raise WeightError(f"{name}: contains NaN or inf")
    ids = torch.arange(len(state["d2t"])) + state["d2t"]  # target id of every draft token
    t2d = state["t2d"]
    if (ids.min() < 0 or ids.max() >= len(t2d) or len(ids.unique()) != len(ids)
            or not bool(t2d[ids.clamp(0, len(t2d) - 1)].all()) or int(t2d.sum()) != len(ids)):
        raise WeightError("d2t/t2d do not form a valid draft vocabulary for this target")


@torch.no_grad()
def swap_in_place(head: DraftHead, state: dict[str, torch.Tensor]) -> None:
    """Validate everything first, then copy tensor by tensor (dtype cast to the head's)."""
    validate_state(head, state)
    own = head.state_dict()
    for name, tensor in state.items():
        own[name].copy_(tensor)
