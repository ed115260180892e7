"""Benchmark: speculative decoding against the target alone, interleaved, in one process.

Per prompt, each method runs back to back (order rotated between prompts) so machine noise hits
all of them alike; figures are ratios measured in the same run. Baselines: the target alone in
the benchmark dtype, the target alone in the other dtype (fp32 <-> bf16; `speedup_vs_fastest`
is against the faster of the two), and optionally transformers' prompt-lookup decoding (`--peer
pld`) as a reference.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch

from tide.checkpoint import load_draft, new_head
from tide.config import TideConfig, to_dict
from tide.lookup import history_from_config
from tide.models import load_target
from tide.policy import policy_from_config
from tide.prompts import Prompt, encode
from tide.speculative import speculative_generate, target_generate

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Spec:
    tally: _Tally = field(default_factory=_Tally)
    passes: int = 0
    accepted: int = 0
    drafted: int = 0
    per_pos: list[int] | None = None
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0
    exact: int = 0
    n: int = 0
    lookup_passes: int = 0
    lookup_accepted: int = 0
    history_passes: int = 0
    history_accepted: int = 0

    def add(self, g, seconds: float, exact: bool) -> None:
        self.tally.add(len(g.tokens), seconds)
        self.passes += g.passes
        self.lookup_passes += g.lookup_passes
        self.lookup_accepted += g.lookup_accepted
        self.history_passes += g.history_passes
        self.history_accepted += g.history_accepted
        self.accepted += g.accepted
        self.drafted += g.drafted
        self.per_pos = g.accepted_per_pos if self.per_pos is None else [
            a + b for a, b in zip(self.per_pos, g.accepted_per_pos)]
        self.draft_s += g.draft_s
        self.verify_s += g.verify_s
        self.prefill_s += g.prefill_s
        self.exact += int(exact)
        self.n += 1

    def costs(self) -> dict:
        p = max(self.passes, 1)
        return {"draft_per_pass": round(1000 * self.draft_s / p, 2),
                "verify_per_pass": round(1000 * self.verify_s / p, 2)}

    def summary(self, base: _Tally) -> dict:
        p = max(self.passes, 1)
        lookup = {}
        # prompt lookup and the answer history drafted these passes, the head the others
        for name, n, acc in (("lookup", self.lookup_passes, self.lookup_accepted),
                             ("history", self.history_passes, self.history_accepted)):
            if n:
                lookup.update({f"{name}_pass_share": round(n / p, 3), f"{name}_accept_len": round((acc + n) / n, 3)})
        if lookup:
            hp = self.passes - self.lookup_passes - self.history_passes
            ha = self.accepted - self.lookup_accepted - self.history_accepted
            lookup["head_accept_len"] = round((ha + hp) / hp, 3) if hp else None
        return {
            "spec_tok_s": round(self.tally.tok_s, 2),
            "baseline_tok_s": round(base.tok_s, 2),
            "speedup": round(self.tally.tok_s / base.tok_s, 3) if base.tok_s else 0.0,
            "mean_accept_len": round((self.accepted + self.passes) / p, 3),
            "accept_rate_per_pos": [round(a / p, 3) for a in (self.per_pos or [])],
            "exact_prompts": self.exact,
            "n_prompts": self.n,
            **lookup,
        }


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _pld(target, ids: list[int], max_new: int) -> tuple[int, float]:
    """transformers' prompt-lookup decoding, greedy; returns (new tokens, seconds)."""
    inp = torch.tensor([ids])
    with torch.inference_mode():
        out, s = _timed(lambda: target.model.generate(
            input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new,
            do_sample=False, temperature=None, top_p=None, top_k=None, prompt_lookup_num_tokens=10,
            pad_token_id=min(target.eos_ids)))
    return out.shape[1] - len(ids), s


def run_bench(cfg: TideConfig, workloads: dict[str, list[Prompt]], draft_dir: str | None,
              peer: str | None = None, spec_both: bool = False, chain_k: int | None = None) -> dict:
    """`spec_both` also speculates with the target in the other dtype (same head, same prompts,
    interleaved): which dtype wins depends on the CPU (bf16 units or not). `chain_k` also
    speculates with the head alone as a chain of that many draft tokens (no tree, no prompt
    lookup): the reference for a tree or for lookup beside the head."""
    params = cfg.decode
    greedy = params.temperature == 0
    target = load_target(cfg.model, cfg.draft.feature_layers)
    other_dtype = "float32" if cfg.model.dtype != "float32" else "bfloat16"
    other = load_target(replace(cfg.model, dtype=other_dtype), cfg.draft.feature_layers)
    if draft_dir:
        head, version = load_draft(draft_dir, target)
    else:
        head, version = new_head(target, cfg.draft.vocab_size, seed=cfg.draft.seed), 0
    other_head = None
    if spec_both:
        other_head = load_draft(draft_dir, other)[0] if draft_dir else new_head(
            other, cfg.draft.vocab_size, seed=cfg.draft.seed)
    base, alt, peer_t = _Tally(), _Tally(), _Tally()
    spec, alt_spec, chain = _Spec(), _Spec(), _Spec()
    chain_params = (replace(params, k=chain_k, tree_topk=0, lookup_ngram=0, history_k=0, draft_threshold=0.0)
                    if chain_k else None)
    # the answer history (decode.history_k > 0) learns each prompt's answer once all its runs are
    # done, as a serving replica learns a request's: later prompts draft from earlier answers
    history = history_from_config(cfg)
    # decode.policy=auto: one controller for the whole run, as a replica keeps one for its life
    policy = policy_from_config(params, target, head, cfg.model.max_context)
    per_wl: dict[str, tuple[_Tally, _Spec, _Spec]] = defaultdict(lambda: (_Tally(), _Spec(), _Spec()))
    items = [(name, p) for name, ps in workloads.items() for p in ps]
    for i, (name, prompt) in enumerate(items):
        ids = encode(target.tokenizer, prompt)
        runs = {
            "base": lambda: target_generate(target, ids, params, cfg.model.max_context),
            "spec": lambda: speculative_generate(target, head, ids, params, cfg.model.max_context, history=history,
                                                 policy=policy),
            "alt": lambda: target_generate(other, ids, params, cfg.model.max_context),
        }
        if other_head is not None:
            runs["alt_spec"] = lambda: speculative_generate(other, other_head, ids, params,
                                                            cfg.model.max_context, history=history)
        if chain_params is not None:
            runs["chain"] = lambda: speculative_generate(target, head, ids, chain_params, cfg.model.max_context)
        if peer == "pld":
            runs["peer"] = lambda: _pld(target, ids, params.max_new_tokens)
        order = list(runs)
        order = order[i % len(order):] + order[: i % len(order)]  # rotate: shared noise
        res = {name_: _timed(runs[name_]) for name_ in order}
        b, bs = res["base"]
        s, ss = res["spec"]
        if history is not None:
            history.add(ids, b.tokens)
        base.add(len(b.tokens), bs)
        alt.add(len(res["alt"][0].tokens), res["alt"][1])
        exact = s.tokens == b.tokens
        spec.add(s, ss, exact)
        per_wl[name][0].add(len(b.tokens), bs)
        per_wl[name][1].add(s, ss, exact)
        if "chain" in res:
            c, cs = res["chain"]
            chain.add(c, cs, c.tokens == b.tokens)
            per_wl[name][2].add(c, cs, c.tokens == b.tokens)
        if "alt_spec" in res:
            a, as_ = res["alt_spec"]
            alt_spec.add(a, as_, a.tokens == res["alt"][0].tokens)
        if "peer" in res:
            peer_t.add(*res["peer"][0])  # (new tokens, seconds inside generate)
        log.info("[%d/%d] %s: accept len %.2f, %d tokens, spec %.2fs vs target %.2fs%s%s%s",
                 i + 1, len(items), name, s.mean_accept_len, len(s.tokens), ss, bs,
                 f", lookup drafted {s.lookup_passes}/{s.passes} passes" if s.lookup_passes else "",
                 f", history {s.history_passes}/{s.passes}" if s.history_passes else "",
                 "" if exact or not greedy else " (tokens differ)")
    out = spec.summary(base)
    p = max(spec.passes, 1)
    fastest = max(base.tok_s, alt.tok_s)
    out.update({
        "speedup_vs_fastest": round(spec.tally.tok_s / fastest, 3) if fastest else 0.0,
        f"baseline_{other_dtype}_tok_s": round(alt.tok_s, 2),
        "exact_match": (spec.exact == spec.n) if greedy else None,
        "k": params.k, "dtype": cfg.model.dtype, "temperature": params.temperature,
        "max_new_tokens": params.max_new_tokens, "draft_version": version, "draft": draft_dir,
        "cost_ms": {  # where a verify pass's time goes
            "draft_per_pass": round(1000 * spec.draft_s / p, 2),
            "verify_per_pass": round(1000 * spec.verify_s / p, 2),
            "target_per_token": round(1000 * base.seconds / max(base.tokens, 1), 2),
            "prefill_per_prompt": round(1000 * spec.prefill_s / max(spec.n, 1), 2),
        },
        "per_workload": {n: s_.summary(b_) for n, (b_, s_, _) in per_wl.items()},
        "policy": policy.stats() if policy is not None else {"policy": "fixed"},
        "config": to_dict(cfg),
    })
    if other_head is not None:
        alt_out = alt_spec.summary(alt)  # against the target alone in that dtype
        alt_out["speedup_vs_fastest"] = round(alt_spec.tally.tok_s / fastest, 3) if fastest else 0.0
        alt_out["exact_match"] = (alt_spec.exact == alt_spec.n) if greedy else None
        alt_out["dtype"] = other_dtype
        ap = max(alt_spec.passes, 1)
        alt_out["cost_ms"] = {
            "draft_per_pass": round(1000 * alt_spec.draft_s / ap, 2),
            "verify_per_pass": round(1000 * alt_spec.verify_s / ap, 2),
            "target_per_token": round(1000 * alt.seconds / max(alt.tokens, 1), 2),
        }
        out["spec_other_dtype"] = alt_out
    if chain_params is not None:
        out["chain"] = {**chain.summary(base), "k": chain_k, "cost_ms": chain.costs(),
                        "per_workload": {n: c_.summary(b_) for n, (b_, _, c_) in per_wl.items()}}
    if peer:
        out["peer"] = peer
        out["peer_tok_s"] = round(peer_t.tok_s, 2)
        out["peer_speedup"] = round(peer_t.tok_s / base.tok_s, 3) if base.tok_s else 0.0
    return out
