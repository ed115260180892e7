"""Training signal on the wire: `HiddenStateRecord` <-> bytes.

A record holds, for every position the target verified in one request, the features the draft
head reads (low/mid/high hidden states), the target's final hidden state (its next-token
distribution is lm_head(final_hidden)), and the token ids. Bytes are a safetensors file whose
metadata carries a JSON header (schema version and provenance); nothing is pickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tide.errors import TideError

SCHEMA_VERSION = 1


class RecordError(TideError, ValueError):
    """Bytes that are not a valid record of this schema."""


@dataclass(frozen=True)
class HiddenStateRecord:
    request_id: str
    target_model_id: str
    draft_version: int
    input_ids: torch.Tensor  # (T+1,) int64: x_0..x_T
    features: torch.Tensor  # (T, 3H): target features at positions 0..T-1
    final_hidden: torch.Tensor  # (T, H): final-norm output at positions 0..T-1
    prompt_len: int  # positions < prompt_len are the prompt
    accept_len: float = 0.0  # the request's served acceptance length (0: not served speculatively)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        T = self.features.shape[0]
        if self.input_ids.shape != (T + 1,) or self.final_hidden.shape[0] != T:
            raise RecordError(
                f"inconsistent record shapes: input_ids {tuple(self.input_ids.shape)}, "
                f"features {tuple(self.features.shape)}, final_hidden {tuple(self.final_hidden.shape)}")

    @property
    def num_positions(self) -> int:
        return self.features.shape[0]

    def header(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "request_id": self.request_id,
            "target_model_id": self.target_model_id,
            "draft_version": self.draft_version,
            "prompt_len": self.prompt_len,
            "accept_len": self.accept_len,
            "positions": [0, self.num_positions],
        }

    def to_bytes(self) -> bytes:
        tensors = {
            "input_ids": self.input_ids.to(torch.int64).contiguous(),
            "features": self.features.contiguous(),
            "final_hidden": self.final_hidden.contiguous(),
        }
        return st_save(tensors, metadata={"tide": json.dumps(self.header())})

    @classmethod
    def from_bytes(cls, data: bytes) -> HiddenStateRecord:
        try:
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
            header = json.loads(meta["tide"])
            tensors = st_load(data)
        except (struct.error, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise RecordError(f"not a tide record: {e}") from None
        if header.get("schema_version") != SCHEMA_VERSION:
            raise RecordError(f"record schema {header.get('schema_version')} != {SCHEMA_VERSION}")
        missing = {"input_ids", "features", "final_hidden"} - tensors.keys()
        if missing:
            raise RecordError(f"record lacks tensors {sorted(missing)}")
        return cls(
            request_id=str(header["request_id"]),
            target_model_id=str(header["target_model_id"]),
            draft_version=int(header["draft_version"]),
            input_ids=tensors["input_ids"],
            features=tensors["features"],
            final_hidden=tensors["final_hidden"],
            prompt_len=int(header["prompt_len"]),
            accept_len=float(header.get("accept_len", 0.0)),
        )


def save_records(records: list[HiddenStateRecord], folder: Path) -> None:
    """A records folder: one `NNNNN.rec` file (HiddenStateRecord bytes) per record."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(records):
        (folder / f"{i:05d}.rec").write_bytes(r.to_bytes())


def load_records(folder: str | Path) -> list[HiddenStateRecord]:
    return [HiddenStateRecord.from_bytes(p.read_bytes()) for p in sorted(Path(folder).glob("*.rec"))]
