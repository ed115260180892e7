"""Prometheus text exposition of the serving counters (the names vLLM/SGLang users look for)."""

from __future__ import annotations


def _line(name: str, value, labels: dict | None = None) -> str:
    lab = ""
    if labels:
        lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return f"{name}{lab} {float(value) if value is not None else 0.0}"


def prometheus_text(replicas: list[dict], http: dict, health: dict | None = None,
                    stream: dict | None = None) -> str:
    """replicas: ServingEngine.stats() of the replicas that answered; http: request counts by
    status; health: the router's view of each replica (up, restarts); stream: the records
    stream's figures (the controller's last tick)."""
    out: list[str] = []

    def metric(name, kind, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(name, v, lab) for lab, v in samples)

    per = lambda key: [({"replica": r["replica"]}, r.get(key, 0)) for r in replicas]
    metric("tide_spec_decode_num_drafts_total", "counter", "verify passes", per("drafts"))
    metric("tide_spec_decode_num_draft_tokens_total", "counter", "draft tokens proposed", per("draft_tokens"))
    metric("tide_spec_decode_num_accepted_tokens_total", "counter", "draft tokens accepted",
           per("accepted_tokens"))
    metric("tide_spec_decode_num_accepted_tokens_per_pos_total", "counter",
           "draft tokens accepted at each draft position",
           [({"replica": r["replica"], "position": i}, v) for r in replicas
            for i, v in enumerate(r.get("accepted_per_pos", []))])
    metric("tide_generation_tokens_total", "counter", "generated tokens", per("generated_tokens"))
    metric("tide_prompt_tokens_total", "counter", "prompt tokens", per("prompt_tokens"))
    metric("tide_draft_version", "gauge", "draft version being served", per("draft_version"))
    metric("tide_draft_swaps_total", "counter", "draft weight updates by outcome",
           [({"replica": r["replica"], "outcome": o}, r.get(f"swaps_{o}", 0)) for r in replicas
            for o in ("applied", "rejected")])
    metric("tide_records_total", "counter", "hidden-state records by outcome",
           [({"replica": r["replica"], "outcome": o}, r.get(f"records_{o}", 0)) for r in replicas
            for o in ("written", "dropped")])
    metric("tide_history_passes_total", "counter", "verify passes drafted by the answer history",
           per("history_passes"))
    metric("tide_history_accepted_tokens_total", "counter", "answer-history draft tokens accepted",
           per("history_accepted"))
    metric("tide_history_answers", "gauge", "answers the replica's history holds", per("history_answers"))
    metric("tide_history_shared_answers_total", "counter",
           "answers shared between replicas: learned (in), sent (out), dropped unsent, skipped as bad",
           [({"replica": r["replica"], "direction": o}, r.get(f"history_shared_{o}", 0)) for r in replicas
            for o in ("in", "out", "dropped", "bad")])
    metric("tide_replica_requests_total", "counter", "requests finished by each replica, by status",
           [({"replica": r["replica"], "status": s}, r.get(f"requests_{s}", 0)) for r in replicas
            for s in ("ok", "failed", "rejected", "cancelled")])
    policies = [(r["replica"], r["policy"]) for r in replicas if r.get("policy")]
    metric("tide_policy_choices_total", "counter", "verify passes by what the speculation policy drafted",
           [({"replica": name, "choice": c}, n) for name, p in policies for c, n in sorted(p["choices"].items())])
    for kind in ("predicted", "measured"):
        metric(f"tide_policy_{kind}_speedup", "gauge",
               f"{kind} tokens per target-alone step over the replica's verify passes so far",
               [({"replica": name}, p.get(f"{kind}_speedup")) for name, p in policies if "passes" in p])
    metric("tide_policy_acceptance_rate", "gauge",
           "acceptance of draft position i when reached, by source, as the policy estimates it",
           [({"replica": name, "source": src, "position": i}, v) for name, p in policies
            for src, rates in p.get("acceptance", {}).items() for i, v in enumerate(rates)])
    if health is not None:
        metric("tide_replica_up", "gauge", "1 while the router sends the replica requests, 0 while it is down",
               [({"replica": f"r{h['replica']}"}, int(h["up"])) for h in health["replicas"]])
        metric("tide_replica_restarts_total", "counter", "times the replica came back after being down",
               [({"replica": f"r{h['replica']}"}, h["restarts"]) for h in health["replicas"]])
    if stream:
        metric("tide_records_stream_bytes", "gauge", "bytes the records stream holds (redis.records_mb caps it)",
               [({}, stream.get("bytes"))])
        metric("tide_records_consumer_lag", "gauge", "records in the stream the trainer has not read yet",
               [({}, stream.get("lag"))])
        metric("tide_records_trimmed_unread_total", "counter",
               "records the stream's byte budget trimmed before the trainer read them",
               [({}, stream.get("trimmed_unread"))])
    metric("tide_records_store_full", "gauge", "1 while Redis refuses the replica's record writes (maxmemory)",
           [({"replica": r["replica"]}, int(bool(r.get("record_store_full")))) for r in replicas])
    metric("tide_http_requests_total", "counter", "HTTP requests by status",
           [({"status": k}, v) for k, v in http.items()])
    return "\n".join(out) + "\n"
