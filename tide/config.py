"""One typed config schema for the whole project.

Dataclasses become an OmegaConf structured config, so YAML files and `key=value` overrides are
type-checked and unknown keys are rejected. Each component receives only its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tide.errors import TideError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(TideError, ValueError):
    """A config file or override that cannot be used; the message says what to fix."""


@dataclass
class ModelConfig:
    # A built-in name (see tide.models.BUILTIN), a local HF folder, or a hub id.
    source: str = "smollm2-135m"
    dtype: str = "bfloat16"  # bfloat16 | float32 | float16
    cache_dir: str = "~/.cache/tide/models"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    max_context: int = 2048  # prompt + generated tokens


@dataclass
class DraftConfig:
    path: str | None = None  # a checkpoint folder; None starts from a fresh (untrained) head
    vocab_size: int = 8192  # reduced draft vocabulary (most frequent target tokens)
    # Target layers whose outputs feed the head (low, mid, high); empty = EAGLE-3's choice.
    feature_layers: list[int] = field(default_factory=list)
    seed: int = 0


@dataclass
class DecodeConfig:
    k: int = 5  # draft tokens proposed per verify pass
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    ttt_steps: int = 3  # training-time-test unroll depth
    seq_len: int = 512  # records are cut into windows of this many positions
    batch_size: int = 8
    epochs: int = 6
    grad_clip: float = 1.0
    seed: int = 0
    # warm start: how the target writes the answers it is trained on
    gen_max_new_tokens: int = 192
    gen_batch_size: int = 16


@dataclass
class TideConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TideConfig:
    """Schema defaults <- conf/default.yaml (or `path`) <- `key=value` overrides."""
    schema = OmegaConf.structured(TideConfig)
    path = Path(path) if path is not None else CONF_DIR / "default.yaml"
    try:
        merged = schema
        if path.exists():
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        elif path != CONF_DIR / "default.yaml":
            raise ConfigError(f"config file not found: {path}")
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config: {e.msg if hasattr(e, 'msg') else e}") from None
    cfg: TideConfig = OmegaConf.to_object(merged)
    _validate(cfg)
    return cfg


def _validate(cfg: TideConfig) -> None:
    d = cfg.decode
    checks = [
        (cfg.model.dtype in ("bfloat16", "float32", "float16"),
         f"model.dtype must be bfloat16, float32 or float16, not {cfg.model.dtype!r}"),
        (d.k >= 1, f"decode.k must be >= 1, not {d.k}"),
        (d.max_new_tokens >= 1, f"decode.max_new_tokens must be >= 1, not {d.max_new_tokens}"),
        (d.temperature >= 0, f"decode.temperature must be >= 0, not {d.temperature}"),
        (0 < d.top_p <= 1, f"decode.top_p must be in (0, 1], not {d.top_p}"),
        (d.top_k >= 0, f"decode.top_k must be >= 0, not {d.top_k}"),
        (cfg.draft.vocab_size >= 16, f"draft.vocab_size must be >= 16, not {cfg.draft.vocab_size}"),
        (cfg.train.ttt_steps >= 1, f"train.ttt_steps must be >= 1, not {cfg.train.ttt_steps}"),
        (cfg.train.lr > 0, f"train.lr must be > 0, not {cfg.train.lr}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def to_dict(cfg) -> dict:
    """The resolved config as plain data, for logging with every run."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
