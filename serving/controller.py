"""The system behind `tide up`: Redis, Ray, serving actors, the online trainer, the HTTP front,
W&B, and a status file. It runs in the foreground (`tide up --foreground`) or as the detached
process that `tide up` starts; `tide down` signals it, and it stops only what it started.

Run folder layout: tide.pid (pid and start time), status.json (live state, rewritten every
second), history.jsonl (one line per tick, for `tide plot`; rotated to history.1.jsonl past
HISTORY_MB), controller.log, drafts/ (the published drafts, resumed by the next `tide up`),
redis/ (embedded server: config with its password, log, pid), wandb/.

Replicas are Ray actors restarted when they die; the HTTP router sends requests around a replica
that is down, and status, history and W&B show how many are up.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path

from serving.drafts import DraftStore
from tide.config import ConfigError, TideConfig, to_dict

HISTORY_MB = 64  # history.jsonl is rotated past this (one older file kept)
LOG_MB = 64  # controller.log too
START_TIMEOUT_S = 540  # a replica or trainer not up by then fails `tide up` (before its own 600 s)
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host (status files never hold secrets)."""
    if "@" in url and ":" in url.split("@")[0].split("//")[-1]:
        scheme, rest = url.split("//", 1)
        cred, host = rest.split("@", 1)
        return f"{scheme}//{cred.split(':')[0]}:***@{host}"
    return url


class Controller:
    def __init__(self, cfg: TideConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.stop_event = threading.Event()
        self.redis_server = None
        self.actors: list = []
        self.trainer = None
        self.http_server = None
        self.wandb_run = None
        self.started_at = time.time()
        self._prev: dict | None = None
        self._prev_choices: dict[str, int] = {}  # the policies' passes by source at the last tick
        self._stream = None  # the records stream, for its figures in status
        self._weights = None  # the weight channel, to keep each published draft in drafts/
        self._kept_version = 0
        self._replica_totals: list[dict | None] = []  # each replica's counters at the last tick
        self.drafts = DraftStore(self.run_dir / "drafts", cfg.redis.keep_versions)
        self.weights_key: bytes | None = None
        self.redis_restarts = 0

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        self._check_secure()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from tide.transport.redis_server import process_start_time

        (self.run_dir / "tide.pid").write_text(json.dumps(
            {"pid": os.getpid(), "start": process_start_time(os.getpid()), "sid": os.getsid(0)}))
        self._write_status("starting")
        self.redis_url = self._start_redis()
        self._resume_draft()
        self._start_ray()
        self._start_actors()
        self._start_http()
        self._start_wandb()
        self._write_status("ready")
        log.info("tide is up: http://%s:%d (run folder %s)", self.cfg.serving.host,
                 self.cfg.serving.port, self.run_dir)

    def _check_secure(self) -> None:
        """Refuse what would expose the system: an HTTP front off loopback without an API key, a
        Redis of the user's own (others may write to it) without a key that signs the weights."""
        sc, rc = self.cfg.serving, self.cfg.redis
        if sc.host not in LOOPBACK and not os.environ.get(sc.api_key_env):
            raise ConfigError(f"serving.host={sc.host} is reachable from other machines: set an API key in "
                              f"${sc.api_key_env} (clients send it as Authorization: Bearer ...), or bind "
                              "127.0.0.1")
        key = os.environ.get(rc.weights_key_env)
        if (os.environ.get(rc.url_env) or rc.url) and not key:
            raise ConfigError(f"with a Redis of your own, set ${rc.weights_key_env} (any secret, the same on "
                              "every machine): replicas apply only drafts signed with it")
        self.weights_key = key.encode() if key else secrets.token_bytes(32)

    def _start_redis(self) -> str:
        url = os.environ.get(self.cfg.redis.url_env) or self.cfg.redis.url
        if url:
            log.info("using Redis at %s", redact(url))
            return url
        from tide.transport.redis_server import start_redis

        rc = self.cfg.redis  # maxmemory: the streams' budgets, the kept drafts and headroom
        self.redis_server = start_redis(self.run_dir / "redis", rc.port or None,
                                        maxmemory_mb=rc.records_mb + rc.answers_mb + 256)
        log.info("started embedded Redis on 127.0.0.1:%d (password in %s)", self.redis_server.port,
                 self.run_dir / "redis" / "redis.conf")
        return self.redis_server.url

    def _weight_channel(self):
        from tide.transport.redis_transport import RedisWeightChannel, connect

        if self._weights is None:
            self._weights = RedisWeightChannel(connect(self.redis_url, 2.0), self.cfg.redis.prefix,
                                               self.cfg.redis.keep_versions, self.weights_key)
        return self._weights

    def _resume_draft(self) -> None:
        """Publish the newest draft kept in the run folder if Redis has nothing newer."""
        self._kept_version = self.drafts.resume(self._weight_channel(), self.cfg.model.source, self.cfg.draft.path)

    def _keep_published(self) -> None:
        self._kept_version = self.drafts.keep_newest(self._weight_channel(), self._kept_version,
                                                     model=self.cfg.model.source, draft_path=self.cfg.draft.path)

    def _start_ray(self) -> None:
        import ray

        kwargs = {"namespace": "tide", "log_to_driver": True, "logging_level": logging.WARNING}
        if self.cfg.ray.address:  # a cluster of the user's: its own auth settings apply
            ray.init(address=self.cfg.ray.address, **kwargs)
        else:
            # a local cluster only this user's processes reach (loopback, no dashboard unless
            # asked for): Ray's token auth would only stop `ray status` from working
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # every process of the local cluster starts with 2 malloc arenas (tide/malloc.py; the
            # actors set it again for clusters started elsewhere)
            os.environ.setdefault("MALLOC_ARENA_MAX", "2")
            os.environ.setdefault("RAY_ROTATION_MAX_BYTES", str(64 << 20))  # Ray's own logs, bounded
            os.environ.setdefault("RAY_ROTATION_BACKUP_COUNT", "1")
            ray.init(address="local", num_cpus=self.cfg.ray.num_cpus or os.cpu_count(),
                     include_dashboard=self.cfg.ray.dashboard, dashboard_host="127.0.0.1",
                     dashboard_port=self.cfg.ray.dashboard_port, _node_ip_address="127.0.0.1",
                     **kwargs)
        log.info("ray: %s", ray.get_runtime_context().gcs_address)

    def _start_actors(self) -> None:
        import ray

        from serving.actor import ServingActor
        from trainers.actor import TrainerActor

        cfg = to_dict(self.cfg)
        # 0 logical CPUs: replicas share the machine's cores by threads. The trainer asks for
        # online.num_cpus / num_gpus: 0 shares them too (it yields to serving, online.busy_share)
        key = self.weights_key.hex()
        # a replica that dies is restarted by Ray (it reloads the target and measures its costs);
        # calls are never retried on another life: the client gets a 503 and retries itself
        sc = self.cfg.serving  # a thread per request in the batch or waiting, and some for stats and probes
        self.actors = [ServingActor.options(name=f"tide-serve-{i}", num_cpus=0, max_restarts=-1, max_task_retries=0,
                                            max_concurrency=sc.max_batch + sc.max_queue + 16)
                       .remote(cfg, self.redis_url, f"r{i}", key)
                       for i in range(self.cfg.serving.replicas)]
        log.info("loading the target in %d replica(s) and measuring what passes cost ...", len(self.actors))
        ray.get([a.ready.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        if self.cfg.online.enabled:  # after the replicas: their cost measurements run undisturbed
            oc = self.cfg.online
            self.trainer = TrainerActor.options(name="tide-trainer", num_cpus=oc.num_cpus, num_gpus=oc.num_gpus,
                                                max_restarts=-1, max_task_retries=0).remote(cfg, self.redis_url, key)
            log.info("starting the online trainer ...")
            ray.get(self.trainer.ready.remote(), timeout=START_TIMEOUT_S)

    def _start_http(self) -> None:
        import ray
        import uvicorn

        from serving.http_api import build_app

        info = ray.get(self.actors[0].ready.remote(), timeout=60)
        app = build_app(self.actors, self.cfg.model.source, self.cfg.model.max_context, info["vocab"],
                        self.cfg.serving)
        self.http_app = app
        config = uvicorn.Config(app, host=self.cfg.serving.host, port=self.cfg.serving.port,
                                log_level="warning", access_log=False)
        self.http_server = uvicorn.Server(config)
        threading.Thread(target=self.http_server.run, name="http", daemon=True).start()
        for _ in range(200):
            if self.http_server.started:
                return
            time.sleep(0.05)
        raise RuntimeError(f"HTTP server did not start on {self.cfg.serving.host}:{self.cfg.serving.port}")

    def _start_wandb(self) -> None:
        mode = self.cfg.wandb.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "disabled":
            return
        import wandb

        self.wandb_run = wandb.init(project=self.cfg.wandb.project, dir=str(self.run_dir), mode=mode,
                                    config=to_dict(self.cfg), name=self.run_dir.name)

    # -- run --------------------------------------------------------------------------------
    def loop(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                self.tick()
            except Exception:
                log.exception("status tick failed (the system keeps serving)")

    def _check_redis(self) -> None:
        """The embedded Redis died: start it again on its port with its password (replicas and
        trainer reconnect by themselves; what was in it is gone, so the kept draft is published
        again)."""
        if self.redis_server is None or self.redis_server.process.poll() is None:
            return
        from tide.transport.redis_server import start_redis

        log.warning("the embedded Redis exited (code %s); starting it again", self.redis_server.process.returncode)
        old, rc = self.redis_server, self.cfg.redis
        self.redis_server = start_redis(old.workdir, old.port, maxmemory_mb=rc.records_mb + rc.answers_mb + 256,
                                        password=old.password)
        self.redis_restarts += 1
        self._kept_version = 0
        self._resume_draft()

    def tick(self) -> dict:
        import ray

        self._check_redis()
        replicas = self._replica_stats()
        trainer, trainer_metrics = None, []
        if self.trainer is not None:
            try:
                trainer = ray.get(self.trainer.stats.remote(), timeout=5)
                trainer_metrics = ray.get(self.trainer.drain_metrics.remote(), timeout=5)
            except (ray.exceptions.RayError, TimeoutError) as e:
                trainer = {"error": f"trainer unavailable: {type(e).__name__}"}
        stream = self._stream_stats()
        self._keep_published()
        live = [r for r in replicas if r.get("state") == "up"]
        row = self._window(replicas)
        row.update(stream_length=(stream or {}).get("length"), records_lag=(stream or {}).get("lag"),
                   records_trimmed_unread=(stream or {}).get("trimmed_unread"),
                   replicas_up=len(live), trainer_step=(trainer or {}).get("trainer_step"),
                   training=(trainer or {}).get("training"), drift=(trainer or {}).get("drift"))
        self._append_history(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"serving/{k}": v for k, v in row.items()
                                if isinstance(v, (int, float)) and v is not None})
            for m in trainer_metrics:
                self.wandb_run.log(m)
        if getattr(self, "http_app", None) is not None:
            self.http_app.state.stream_stats = stream  # for /metrics
        state = "ready" if len(live) == len(replicas) else "degraded"
        self._write_status(state, replicas, trainer, stream, row)
        return row

    def _replica_stats(self) -> list[dict]:
        """Each replica's stats; one that is dead or restarting is {"state": "down", ...}."""
        import ray

        refs = [a.stats.remote() for a in self.actors]
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append({**ray.get(ref, timeout=10), "state": "up"})
            except (ray.exceptions.RayError, TimeoutError) as e:
                out.append({"replica": f"r{i}", "state": "down", "error": type(e).__name__})
        return out

    def _append_history(self, row: dict) -> None:
        path = self.run_dir / "history.jsonl"
        if path.exists() and path.stat().st_size > HISTORY_MB << 20:
            path.replace(self.run_dir / "history.1.jsonl")  # the one before is dropped
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log_path = self.run_dir / "controller.log"
        if log_path.exists() and log_path.stat().st_size > LOG_MB << 20:
            # copy, then truncate: this process (and Ray's forwarded actor logs) write to it
            # through a descriptor opened for appending, so writing simply goes on at the start
            log_path.with_name("controller.1.log").write_bytes(log_path.read_bytes())
            os.truncate(log_path, 0)

    def _window(self, replicas: list[dict]) -> dict:
        """Acceptance over the last tick (what W&B and the plot show), plus totals. Counts are
        differenced per replica: a restarted replica's counters start again from 0."""
        keys = ("drafts", "accepted_tokens", "generated_tokens", "decode_s", "requests_ok")
        if len(self._replica_totals) != len(replicas):
            self._replica_totals = [None] * len(replicas)
        d = {k: 0.0 for k in keys}
        dpos: list[float] = []
        for i, r in enumerate(replicas):
            if r.get("state") != "up":
                continue
            now = {**{k: r.get(k, 0) for k in keys}, "per_pos": list(r.get("accepted_per_pos", []))}
            prev = self._replica_totals[i]
            if prev is None or now["requests_ok"] < prev["requests_ok"]:  # first tick, or a new life
                prev = {**{k: 0 for k in keys}, "per_pos": [0] * len(now["per_pos"])}
            for k in keys:
                d[k] += now[k] - prev[k]
            delta = [a - b for a, b in zip(now["per_pos"], prev["per_pos"])]
            dpos = [a + b for a, b in zip(dpos, delta)] if dpos else delta
            self._replica_totals[i] = now
        live = [r for r in replicas if r.get("state") == "up"]
        policy = self._policy_window(live)
        row = {"t": round(time.time(), 3), "elapsed_s": round(time.time() - self.started_at, 1),
               "draft_version": max((r["draft_version"] for r in live), default=None),
               "requests": sum(r.get("requests_ok", 0) for r in live),
               "generated_tokens": sum(r.get("generated_tokens", 0) for r in live)}
        if d["drafts"] > 0:
            row["accept_len"] = round((d["accepted_tokens"] + d["drafts"]) / d["drafts"], 4)
            row["tok_s"] = round(d["generated_tokens"] / max(d["decode_s"], 1e-9), 2)
            for i, v in enumerate(dpos):
                row[f"accept_rate_pos{i}"] = round(v / d["drafts"], 4)
        row.update(policy)
        return row

    def _policy_window(self, replicas: list[dict]) -> dict:
        """The policy's choices over the last tick (share of passes by source) and its predicted
        and measured speedup so far (passes-weighted mean over replicas)."""
        policies = [r["policy"] for r in replicas if r.get("policy", {}).get("policy") == "auto"]
        if not policies:
            return {}
        by_source: dict[str, int] = {}
        for p in policies:
            for choice, n in p["choices"].items():
                by_source[choice.split(":")[0]] = by_source.get(choice.split(":")[0], 0) + n
        prev, self._prev_choices = self._prev_choices, by_source
        window = {k: n - prev.get(k, 0) for k, n in by_source.items()}
        total = sum(window.values())
        row = {f"policy_{k}_share": round(n / total, 4) for k, n in window.items()} if total else {}
        passes = sum(p["passes"] for p in policies)
        for kind in ("predicted", "measured"):
            vals = [(p[f"{kind}_speedup"], p["passes"]) for p in policies if p.get(f"{kind}_speedup")]
            if vals and passes:
                row[f"{kind}_speedup"] = round(sum(v * n for v, n in vals) / sum(n for _, n in vals), 4)
        gains = [p["gain"] for p in policies if p.get("gain") is not None]
        if gains:  # what the trainer is told speculation earns (the lowest replica's)
            row["speculation_gain"] = min(gains)
        return row

    def _stream_stats(self) -> dict | None:
        """The records stream: length, bytes, lag (not read by the trainer yet), trimmed unread."""
        from tide.transport.base import TransportError
        from tide.transport.redis_transport import RedisRecordStream, connect

        if self._stream is None:  # one client for the controller's life, not one per tick
            self._stream = RedisRecordStream(connect(self.redis_url, 1.0), self.cfg.redis.prefix,
                                             self.cfg.redis.records_mb << 20)
        try:
            return self._stream.stats()
        except TransportError:
            return None

    def _write_status(self, state: str, replicas=None, trainer=None, stream=None, row=None) -> None:
        replicas = replicas or []
        live = [r for r in replicas if r.get("state") == "up"]
        full = any(r.get("record_store_full") for r in live)
        status = {
            "state": state, "pid": os.getpid(), "run_dir": str(self.run_dir),
            "http": f"http://{self.cfg.serving.host}:{self.cfg.serving.port}",
            "redis": redact(getattr(self, "redis_url", "") or ""),
            "replicas_up": f"{len(live)}/{len(replicas)}" if replicas else None,
            "draft_version": max((r["draft_version"] for r in live), default=None),
            "kept_draft": self._kept_version or None,
            "served_tokens": sum(r.get("generated_tokens", 0) for r in live),
            "requests": sum(r.get("requests_ok", 0) for r in live),
            "acceptance_ema": [r.get("accept_len_ema") for r in live],
            "last_window": row, "stream_length": (stream or {}).get("length"),
            # the records stream: bytes held, entries the trainer has not read (lag), entries the
            # byte budget trimmed before it read them; "full": Redis refused writes (maxmemory)
            "redis_restarts": self.redis_restarts,
            "records": {**(stream or {}), "budget_mb": self.cfg.redis.records_mb,
                        "redis_full": full} if stream is not None else {"redis": "unreachable"},
            "trainer_step": (trainer or {}).get("trainer_step"),
            # what each replica's speculation policy drafts, and its predicted vs measured speedup
            "policy": [{"replica": r["replica"], **{k: r["policy"].get(k) for k in
                        ("choices", "predicted_speedup", "measured_speedup", "gain", "acceptance")}}
                       for r in live if r.get("policy")],
            "last_swap": max(({"at": r["last_swap_at"], "latency_s": r["last_swap_latency_s"],
                               "replica": r["replica"]} for r in live if r.get("last_swap_at")),
                             key=lambda s: s["at"], default=None),
            "replicas": replicas, "trainer": trainer, "updated_at": time.time(),
        }
        tmp = self.run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2, default=str))
        tmp.replace(self.run_dir / "status.json")

    # -- stop -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self.stop_event.set()
        if self.http_server is not None:
            self.http_server.should_exit = True
        if self.wandb_run is not None:
            self.wandb_run.finish()
        try:
            import ray

            if ray.is_initialized():
                for a in [*self.actors, self.trainer]:
                    if a is not None:
                        ray.kill(a)
                ray.shutdown()  # ends the local cluster this process started, nothing else
        finally:
            if self.redis_server is not None:
                self.redis_server.stop()
            self._write_status("stopped")
            (self.run_dir / "tide.pid").unlink(missing_ok=True)


def run_foreground(cfg: TideConfig, run_dir: Path) -> int:
    ctl = Controller(cfg, run_dir)
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: ctl.stop_event.set())
    try:
        ctl.start()
        ctl.loop()
    finally:
        ctl.shutdown()
    return 0
