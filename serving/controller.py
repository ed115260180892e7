"""The system behind `tide up`: Redis, Ray, serving actors, the online trainer, the HTTP front,
W&B, and a status file. It runs in the foreground (`tide up --foreground`) or as the detached
process that `tide up` starts; `tide down` signals it, and it stops only what it started.

Run folder layout: tide.pid, status.json (live state, rewritten every second), history.jsonl
(one line per tick, for `tide plot`), controller.log, redis/ (embedded server), wandb/.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from tide.config import TideConfig, to_dict

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
        self._stream = None  # the records stream, for its length in status

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "tide.pid").write_text(str(os.getpid()))
        self._write_status("starting")
        self.redis_url = self._start_redis()
        self._start_ray()
        self._start_actors()
        self._start_http()
        self._start_wandb()
        self._write_status("ready")
        log.info("tide is up: http://%s:%d (run folder %s)", self.cfg.serving.host,
                 self.cfg.serving.port, self.run_dir)

    def _start_redis(self) -> str:
        url = os.environ.get(self.cfg.redis.url_env) or self.cfg.redis.url
        if url:
            log.info("using Redis at %s", redact(url))
            return url
        from tide.transport.redis_server import start_redis

        self.redis_server = start_redis(self.run_dir / "redis", self.cfg.redis.port or None)
        log.info("started embedded Redis on 127.0.0.1:%d", self.redis_server.port)
        return self.redis_server.url

    def _start_ray(self) -> None:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local cluster
        kwargs = {"namespace": "tide", "log_to_driver": True, "logging_level": logging.WARNING}
        if self.cfg.ray.address:
            ray.init(address=self.cfg.ray.address, **kwargs)
        else:
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
        self.actors = [ServingActor.options(name=f"tide-serve-{i}", num_cpus=0).remote(
            cfg, self.redis_url, f"r{i}") for i in range(self.cfg.serving.replicas)]
        log.info("loading the target in %d replica(s) and measuring what passes cost ...", len(self.actors))
        ray.get([a.ready.remote() for a in self.actors])
        if self.cfg.online.enabled:  # after the replicas: their cost measurements run undisturbed
            oc = self.cfg.online
            self.trainer = TrainerActor.options(name="tide-trainer", num_cpus=oc.num_cpus, num_gpus=oc.num_gpus,
                                                max_restarts=-1, max_task_retries=0).remote(cfg, self.redis_url)
            log.info("starting the online trainer ...")
            ray.get(self.trainer.ready.remote())

    def _start_http(self) -> None:
        import ray
        import uvicorn

        from serving.http_api import build_app

        max_context = ray.get(self.actors[0].max_context.remote())
        app = build_app(self.actors, self.cfg.model.source, max_context, self.cfg.serving.max_queue,
                        self.cfg.serving.api_key_env)
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

    def tick(self) -> dict:
        import ray

        replicas = ray.get([a.stats.remote() for a in self.actors], timeout=10)
        trainer, trainer_metrics = None, []
        if self.trainer is not None:
            try:
                trainer = ray.get(self.trainer.stats.remote(), timeout=5)
                trainer_metrics = ray.get(self.trainer.drain_metrics.remote(), timeout=5)
            except (ray.exceptions.RayError, TimeoutError) as e:
                trainer = {"error": f"trainer unavailable: {type(e).__name__}"}
        stream_len = self._stream_length()
        row = self._window(replicas)
        row.update(stream_length=stream_len, trainer_step=(trainer or {}).get("trainer_step"),
                   training=(trainer or {}).get("training"), drift=(trainer or {}).get("drift"))
        with open(self.run_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"serving/{k}": v for k, v in row.items()
                                if isinstance(v, (int, float)) and v is not None})
            for m in trainer_metrics:
                self.wandb_run.log(m)
        self._write_status("ready", replicas, trainer, stream_len, row)
        return row

    def _window(self, replicas: list[dict]) -> dict:
        """Acceptance over the last tick (what W&B and the plot show), plus totals."""
        tot = {k: sum(r.get(k, 0) for r in replicas) for k in
               ("drafts", "accepted_tokens", "generated_tokens", "decode_s", "requests_ok")}
        per_pos = [sum(v) for v in zip(*[r.get("accepted_per_pos", []) for r in replicas])]
        prev = self._prev or {**{k: 0 for k in tot}, "per_pos": [0] * len(per_pos)}
        d = {k: tot[k] - prev[k] for k in tot}
        dpos = [a - b for a, b in zip(per_pos, prev["per_pos"])]
        self._prev = {**tot, "per_pos": per_pos}
        versions = [r["draft_version"] for r in replicas]
        policy = self._policy_window(replicas)
        row = {"t": round(time.time(), 3), "elapsed_s": round(time.time() - self.started_at, 1),
               "draft_version": max(versions), "requests": tot["requests_ok"],
               "generated_tokens": tot["generated_tokens"]}
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
        return row

    def _stream_length(self) -> int | None:
        from tide.transport.base import TransportError
        from tide.transport.redis_transport import RedisRecordStream, connect

        if self._stream is None:  # one client for the controller's life, not one per tick
            self._stream = RedisRecordStream(connect(self.redis_url, 1.0), self.cfg.redis.prefix)
        try:
            return self._stream.length()
        except TransportError:
            return None

    def _write_status(self, state: str, replicas=None, trainer=None, stream_len=None, row=None) -> None:
        replicas = replicas or []
        status = {
            "state": state, "pid": os.getpid(), "run_dir": str(self.run_dir),
            "http": f"http://{self.cfg.serving.host}:{self.cfg.serving.port}",
            "redis": redact(getattr(self, "redis_url", "") or ""),
            "draft_version": max((r["draft_version"] for r in replicas), default=None),
            "served_tokens": sum(r.get("generated_tokens", 0) for r in replicas),
            "requests": sum(r.get("requests_ok", 0) for r in replicas),
            "acceptance_ema": [r.get("accept_len_ema") for r in replicas],
            "last_window": row, "stream_length": stream_len,
            "trainer_step": (trainer or {}).get("trainer_step"),
            # what each replica's speculation policy drafts, and its predicted vs measured speedup
            "policy": [{"replica": r["replica"], **{k: r["policy"].get(k) for k in
                        ("choices", "predicted_speedup", "measured_speedup", "acceptance")}}
                       for r in replicas if r.get("policy")],
            "last_swap": max(({"at": r["last_swap_at"], "latency_s": r["last_swap_latency_s"],
                               "replica": r["replica"]} for r in replicas if r.get("last_swap_at")),
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
