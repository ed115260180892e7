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
    # fast few-row products (verify passes): fp32 as W @ x^T; bf16 on AVX2-only CPUs with
    # tide.kernels (built once); see tide.models.SkinnyLinear
    skinny_matmul: bool = True
    # tide.kernels' bf16 products and attention (needs AVX2+FMA and skinny_matmul). auto: every
    # pass on CPUs without bf16 units, where torch's bf16 is slow, and passes of up to 128 rows on
    # AVX512-BF16 CPUs without AMX (on vdpbf16ps: every step, verify and tree, faster there and
    # exact); always: every pass on any AVX2 CPU, for bf16 speculation bit-identical to the bf16
    # target alone at any width (long prefills slower than AVX512-BF16/AMX); never: torch's bf16 path
    bf16_kernel: str = "auto"


@dataclass
class DraftConfig:
    path: str | None = None  # a checkpoint folder; None starts from a fresh (untrained) head
    vocab_size: int = 8192  # reduced draft vocabulary (most frequent target tokens)
    # Target layers whose outputs feed the head (low, mid, high); empty = EAGLE-3's choice.
    feature_layers: list[int] = field(default_factory=list)
    seed: int = 0


@dataclass
class DecodeConfig:
    # auto: every pass drafts what this machine's costs and the draft's acceptance so far say pays
    # best (tide.policy: none, the head's chain of up to k, a tree of `trees`, a copy from prompt
    # lookup or the answer history); fixed: always the configured k / tree / lookup order
    policy: str = "auto"
    k: int = 5  # draft tokens proposed per verify pass (with a tree: its depth); auto: the longest chain
    # a chain stops early when the draft's probability of it falls below this (0 = always k):
    # a weak head's long chains cost verify width and are rarely accepted
    draft_threshold: float = 0.0
    # greedy only: a draft tree (EAGLE-2) that expands the tree_topk best tokens of the draft at
    # each of k steps and verifies the tree_tokens most probable in one pass; 0 or 1: a chain
    tree_topk: int = 0
    tree_tokens: int = 16
    # the tree shapes `auto` may draft, "depth:topk:nodes"
    trees: list[str] = field(default_factory=lambda: ["1:2:2", "1:3:3", "1:4:4", "3:4:8", "3:5:10"])
    # prompt lookup beside the head (tide.lookup): when the last n tokens, n from lookup_ngram
    # down to lookup_min_ngram, occurred before, the k tokens that followed are checked instead
    # of the head's draft; 0 = off. lookup_k: the longest copy; a copy proposes k tokens, or more,
    # up to lookup_k, as far as its match reaches back (0 = always k)
    lookup_ngram: int = 0  # conf/default.yaml, what every command loads, turns it on (3, up to 16)
    lookup_min_ngram: int = 2
    lookup_k: int = 0
    # drafts from earlier answers (tide.lookup.AnswerHistory) where prompt lookup finds none:
    # chains of up to history_k tokens; 0 = off. Where the history lives and what seeds it:
    # serving.history_*
    history_k: int = 0
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None


@dataclass
class TrainConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    ttt_steps: int = 3  # training-time-test unroll depth
    seq_len: int = 512  # records are cut into windows of this many positions
    batch_size: int = 4
    epochs: int = 6
    grad_clip: float = 1.0
    warmup_frac: float = 0.05  # offline warm start: linear warmup over this share of the steps,
    min_lr_frac: float = 0.1  # then cosine decay to this fraction of lr
    seed: int = 0
    # warm start: how the target writes the answers it is trained on
    gen_max_new_tokens: int = 192
    gen_batch_size: int = 48
    gen_samples: int = 5  # answers per prompt: the first greedy, the rest a sampled prefix then greedy
    gen_temperature: float = 0.8
    gen_sampled_prefix: int = 24  # sampled tokens before greedy: uniform in [0, this]
    # distinct prompts the target writes itself (Magpie), answered once each, greedy; 0: none
    gen_synth_prompts: int = 0
    # dtype of the target while it writes data. auto: bfloat16 on CPUs with bf16 units (AMX /
    # AVX512-BF16: 2.3x the fp32 rate at batch 64), float32 elsewhere (CPUs without bf16 units
    # decode fp32 batches ~5x faster than bf16). Features are stored as bf16 either way.
    gen_dtype: str = "auto"
    # the warm start's training precision. auto: the forward under bf16 autocast on CPUs with
    # bf16 units (1.9x the fp32 rate), fp32 elsewhere (GPUs: TF32). bfloat16 | float32 force it.
    precision: str = "auto"
    # where the warm start runs (the target writing answers, then the head training): cpu, or
    # cuda / cuda:N on a GPU machine (with train.gen_batch_size ~1024); the head serves on any
    device: str = "cpu"


@dataclass
class OnlineConfig:
    """When the online trainer trains and publishes (TIDE's selective training control)."""

    enabled: bool = True  # false: a static draft (the comparison run)
    lr: float = 1e-3  # fine-tuning rate (the warm start's train.lr is for a fresh head)
    buffer_records: int = 256  # replay buffer of recent records, at most this many
    buffer_mb: int = 512  # ... and at most this many MB of them (the oldest go first)
    recent_records: int = 32  # half of every batch comes from the newest this many: new traffic
    # is learned within minutes, the other half replays the whole buffer against forgetting
    holdout_every: int = 4  # every n-th record is held out for the eval gate
    holdout_records: int = 24  # the most recent held-out records: the gate follows the traffic
    drift_lookback: int = 4  # on drift the eval gate judges only on held-out records among the
    # last this-many up to the one that fired (the short average's memory) and later: new traffic
    min_records: int = 8  # train only once this many records are buffered
    eval_every: int = 25  # train steps between eval-gate decisions
    gate_margin: float = 0.02  # candidate must beat the serving draft by this (sim. accept len)
    ema_short: float = 0.3  # weights of the short / long moving averages of served acceptance
    ema_long: float = 0.02
    drift_margin: float = 0.08  # drift: short average below long average by this fraction
    goal_accept_len: float = 3.5  # keep training while served acceptance is below this
    patience: int = 4  # gate rejections in a row (no drift) before training pauses
    threads: int = 1
    # training on idle compute: full speed while every replica idles; while any serves requests,
    # the share of the time that speculation earns them (gain - 1), at least busy_share_min and at
    # most busy_share, which bounds what serving on a shared machine can lose to it; busy_share 1.0
    # where the trainer has a node or a GPU of its own (num_cpus / num_gpus)
    busy_share: float = 0.2
    busy_share_min: float = 0.03
    niceness: int = 19  # the trainer's OS priority (Linux nice): below serving's where they share cores
    num_cpus: float = 0  # Ray resources the trainer actor asks for: Ray places it where they are
    num_gpus: float = 0


@dataclass
class RedisConfig:
    url: str | None = None  # null: start an embedded redis-server on 127.0.0.1
    url_env: str = "TIDE_REDIS_URL"  # when this env var is set it wins (passwords stay out of files)
    prefix: str = "tide"
    records_mb: int = 256  # the records stream's byte budget: the oldest are trimmed past it
    answers_mb: int = 16  # the answers the replicas share (serving.history_share), the same way
    keep_versions: int = 3  # published drafts kept in Redis (and in the run folder's drafts/)
    # signs published drafts (HMAC-SHA256) so replicas apply only the trainer's. Required with a
    # Redis of your own (redis.url); the embedded one gets a random key per `tide up`
    weights_key_env: str = "TIDE_WEIGHTS_KEY"
    port: int = 0  # embedded server port; 0 picks a free one


@dataclass
class RayConfig:
    address: str | None = None  # null: start a local cluster on loopback; else join this one
    num_cpus: int = 0  # local cluster size; 0 = all cores
    dashboard: bool = False  # Ray's dashboard (its job API runs commands): only when asked for
    dashboard_port: int = 8265


@dataclass
class ServingConfig:
    replicas: int = 1
    max_queue: int = 8  # requests waiting per replica (beyond its batch) before new ones are refused
    max_batch: int = 16  # requests one replica decodes together (continuous batching, tide/batch.py)
    kv_cache_mb: int = 1024  # its preallocated KV cache: fewer rows than max_batch when this is short
    prefill_chunk: int = 256  # prompt tokens prefilled per step while the batch decodes on
    swap_poll_s: float = 0.25  # how often a replica checks for newly published draft weights (one GET)
    record_queue: int = 32  # records waiting to be written before new ones are dropped
    capture: bool = True  # stream hidden states of served requests
    speculative: bool = True  # false: the target alone (the baseline for load comparisons)
    threads: int = 1  # torch threads per replica
    host: str = "127.0.0.1"  # HTTP front (OpenAI-compatible)
    port: int = 8000
    api_key_env: str = "TIDE_API_KEY"  # when set, every route but /health needs this bearer key;
    # a host other than loopback is refused without one
    max_body_bytes: int = 1_000_000  # larger request bodies are refused (413)
    max_prompt_chars: int = 200_000  # a prompt or message longer than this is refused (400)
    request_timeout_s: float = 600.0  # a replica that does not answer within this: 504
    # each replica's AnswerHistory (used when decode.history_k > 0): the answer tokens it keeps
    # (oldest forgotten first), the longest context of its counted chains, the tokens that must
    # match for a copy from one earlier answer (0: no copies), and a records folder (the warm
    # start's --records) whose answers it learns at startup; empty: it starts empty
    history_tokens: int = 200_000
    history_ngram: int = 3
    history_match_ngram: int = 12
    history_records: str = ""
    # every replica's answers draft on every replica: each served answer goes to Redis
    # ({redis.prefix}:answers, the newest redis.answers_mb kept), and a replica that starts
    # learns the ones kept there. false: each replica learns only its own
    history_share: bool = True


@dataclass
class WandbConfig:
    project: str = "tide"
    mode: str | None = None  # null: online when WANDB_API_KEY is set, else offline


@dataclass
class TideConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run_dir: str = "runs"


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
        (cfg.model.bf16_kernel in ("auto", "always", "never"),
         f"model.bf16_kernel must be auto, always or never, not {cfg.model.bf16_kernel!r}"),
        (cfg.train.gen_dtype in ("auto", "bfloat16", "float32", "float16"),
         f"train.gen_dtype must be auto, bfloat16, float32 or float16, not {cfg.train.gen_dtype!r}"),
        (cfg.train.precision in ("auto", "bfloat16", "float32"),
         f"train.precision must be auto, bfloat16 or float32, not {cfg.train.precision!r}"),
        (cfg.train.device == "cpu" or cfg.train.device.split(":")[0] == "cuda",
         f"train.device must be cpu, cuda or cuda:N, not {cfg.train.device!r}"),
        (d.policy in ("auto", "fixed"), f"decode.policy must be auto or fixed, not {d.policy!r}"),
        (d.k >= 1, f"decode.k must be >= 1, not {d.k}"),
        (0 <= d.draft_threshold < 1, f"decode.draft_threshold must be in [0, 1), not {d.draft_threshold}"),
        (d.tree_topk >= 0, f"decode.tree_topk must be >= 0, not {d.tree_topk}"),
        (d.tree_tokens >= 1, f"decode.tree_tokens must be >= 1, not {d.tree_tokens}"),
        (d.lookup_ngram >= 0, f"decode.lookup_ngram must be >= 0 (0 = off), not {d.lookup_ngram}"),
        (d.lookup_ngram == 0 or 1 <= d.lookup_min_ngram <= d.lookup_ngram,
         f"decode.lookup_min_ngram must be in [1, decode.lookup_ngram], not {d.lookup_min_ngram}"),
        (d.lookup_k >= 0, f"decode.lookup_k must be >= 0 (0 = decode.k), not {d.lookup_k}"),
        (d.history_k >= 0, f"decode.history_k must be >= 0 (0 = off), not {d.history_k}"),
        (cfg.serving.history_ngram >= 2, f"serving.history_ngram must be >= 2, not {cfg.serving.history_ngram}"),
        (cfg.serving.history_tokens >= 1, f"serving.history_tokens must be >= 1, not {cfg.serving.history_tokens}"),
        (cfg.serving.history_match_ngram == 0 or cfg.serving.history_match_ngram >= 2,
         f"serving.history_match_ngram must be 0 (no copies) or >= 2, not {cfg.serving.history_match_ngram}"),
        (d.tree_topk <= cfg.draft.vocab_size,
         f"decode.tree_topk ({d.tree_topk}) cannot exceed draft.vocab_size ({cfg.draft.vocab_size})"),
        (d.max_new_tokens >= 1, f"decode.max_new_tokens must be >= 1, not {d.max_new_tokens}"),
        (d.temperature >= 0, f"decode.temperature must be >= 0, not {d.temperature}"),
        (0 < d.top_p <= 1, f"decode.top_p must be in (0, 1], not {d.top_p}"),
        (d.top_k >= 0, f"decode.top_k must be >= 0, not {d.top_k}"),
        (cfg.draft.vocab_size >= 16, f"draft.vocab_size must be >= 16, not {cfg.draft.vocab_size}"),
        (cfg.train.gen_synth_prompts >= 0,
         f"train.gen_synth_prompts must be >= 0, not {cfg.train.gen_synth_prompts}"),
        (cfg.train.ttt_steps >= 1, f"train.ttt_steps must be >= 1, not {cfg.train.ttt_steps}"),
        (cfg.train.lr > 0, f"train.lr must be > 0, not {cfg.train.lr}"),
        (cfg.serving.replicas >= 1, f"serving.replicas must be >= 1, not {cfg.serving.replicas}"),
        (cfg.serving.max_queue >= 1, f"serving.max_queue must be >= 1, not {cfg.serving.max_queue}"),
        (cfg.serving.max_batch >= 1, f"serving.max_batch must be >= 1, not {cfg.serving.max_batch}"),
        (cfg.serving.kv_cache_mb >= 1, f"serving.kv_cache_mb must be >= 1, not {cfg.serving.kv_cache_mb}"),
        (cfg.serving.prefill_chunk >= 1, f"serving.prefill_chunk must be >= 1, not {cfg.serving.prefill_chunk}"),
        (cfg.serving.max_body_bytes >= 1024,
         f"serving.max_body_bytes must be >= 1024, not {cfg.serving.max_body_bytes}"),
        (cfg.serving.max_prompt_chars >= 1,
         f"serving.max_prompt_chars must be >= 1, not {cfg.serving.max_prompt_chars}"),
        (cfg.serving.request_timeout_s > 0,
         f"serving.request_timeout_s must be > 0, not {cfg.serving.request_timeout_s}"),
        (cfg.redis.records_mb >= 1, f"redis.records_mb must be >= 1, not {cfg.redis.records_mb}"),
        (cfg.redis.answers_mb >= 1, f"redis.answers_mb must be >= 1, not {cfg.redis.answers_mb}"),
        (cfg.redis.keep_versions >= 1, f"redis.keep_versions must be >= 1, not {cfg.redis.keep_versions}"),
        (cfg.online.holdout_records >= 2, f"online.holdout_records must be >= 2, not {cfg.online.holdout_records}"),
        (0 <= cfg.online.busy_share <= 1, f"online.busy_share must be in [0, 1], not {cfg.online.busy_share}"),
        (0 <= cfg.online.niceness <= 19, f"online.niceness must be in [0, 19], not {cfg.online.niceness}"),
        (0 <= cfg.online.busy_share_min <= cfg.online.busy_share,
         f"online.busy_share_min must be in [0, online.busy_share], not {cfg.online.busy_share_min}"),
        (cfg.online.num_cpus >= 0 and cfg.online.num_gpus >= 0, "online.num_cpus and online.num_gpus must be >= 0"),
        (cfg.online.drift_lookback >= 0, f"online.drift_lookback must be >= 0, not {cfg.online.drift_lookback}"),
        (cfg.wandb.mode in (None, "online", "offline", "disabled"),
         f"wandb.mode must be online, offline or disabled, not {cfg.wandb.mode!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    tree_shapes(d.trees)


def tree_shapes(texts: list[str]) -> list[tuple[int, int, int]]:
    """["depth:topk:nodes", ...] -> shapes; a ConfigError names a malformed one."""
    shapes = []
    for text in texts:
        try:
            depth, topk, nodes = (int(v) for v in str(text).split(":"))
        except ValueError:
            raise ConfigError(f"decode.trees: {text!r} is not depth:topk:nodes (e.g. 3:4:8)") from None
        if depth < 1 or topk < 2 or nodes < 1:
            raise ConfigError(f"decode.trees: {text!r} needs depth >= 1, topk >= 2, nodes >= 1")
        shapes.append((depth, topk, nodes))
    return shapes


def from_dict(data: dict) -> TideConfig:
    """Rebuild a config sent between processes as plain data (JSON-safe, never pickled)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TideConfig), data))


def to_dict(cfg) -> dict:
    """The resolved config as plain data, for logging with every run."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
