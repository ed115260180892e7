"""Faults of the running system (`tide up`, a tiny model, 2 replicas, the trainer): a replica
killed under load, forged weights, Redis killed, the trainer killed, the controller killed.
Serving never returns a 500, requests in flight on a dead replica get a retryable 503, and
everything comes back by itself. The tests run in order on one system."""

import json
import os
import signal
import threading
import time

import httpx
import pytest

from serving.launcher import session_members
from tests.conftest import tide_cli
from tide.checkpoint import new_head, state_to_bytes
from tide.config import ModelConfig
from tide.models import load_target
from tide.transport.redis_server import free_port, local_url, process_start_time
from tide.transport.redis_transport import RedisWeightChannel, connect

pytestmark = pytest.mark.integration
WEIGHTS_KEY = "test-weights-key"


@pytest.fixture(scope="module")
def system(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults")
    port = free_port()
    env = {**os.environ, "WANDB_SILENT": "true", "TIDE_WEIGHTS_KEY": WEIGHTS_KEY}
    env.pop("TIDE_API_KEY", None)
    overrides = [f"model.source={tiny_model_dir}", "model.dtype=float32", "model.max_context=256",
                 "draft.vocab_size=100000", f"serving.port={port}", "serving.replicas=2", "serving.max_queue=4",
                 "ray.num_cpus=2", "wandb.mode=disabled", "online.min_records=1000000"]
    up = tide_cli("up", "--run-dir", str(run_dir), *overrides, env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    yield {"url": f"http://127.0.0.1:{port}", "run_dir": run_dir, "env": env, "model_dir": tiny_model_dir}
    tide_cli("down", "--run-dir", str(run_dir), env=env)


def _status(system) -> dict:
    return json.loads((system["run_dir"] / "status.json").read_text())


def _wait(cond, timeout=90.0, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return True
        except (KeyError, TypeError, ValueError, OSError, httpx.HTTPError):
            pass
        time.sleep(every)
    return False


class Load:
    """Clients sending requests back to back until stopped; every answer's status is kept."""

    def __init__(self, url, clients=4, max_tokens=64):
        self.url, self.max_tokens = url, max_tokens
        self.codes: list[int] = []
        self.retry_after_503: list[str | None] = []  # the Retry-After of each plain HTTP 503
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i):
        n = 0
        while not self.stop.is_set():
            body = {"prompt": f"story number {i} {n}: once upon a time", "max_tokens": self.max_tokens,
                    "temperature": 0, "stream": n % 2 == 1}
            n += 1
            try:
                r = httpx.post(self.url + "/v1/completions", json=body, timeout=120)
                if r.status_code == 200 and body["stream"] and '"error"' in r.text:
                    self.codes.append(503 if "service_unavailable" in r.text else 500)
                else:
                    self.codes.append(r.status_code)
                if r.status_code == 503:
                    self.retry_after_503.append(r.headers.get("retry-after"))
            except httpx.HTTPError:
                self.codes.append(-1)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(180)


def _ok(url, n=3):
    for i in range(n):
        r = httpx.post(url + "/v1/completions", json={"prompt": f"hello {i}", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, r.text


def test_a_replica_killed_under_load_restarts_and_is_routed_around(system):
    url = system["url"]
    assert _wait(lambda: len(_status(system)["replicas"]) == 2 and _status(system)["replicas"][0].get("pid"))
    victim = _status(system)["replicas"][0]["pid"]
    with Load(url) as load:
        time.sleep(2.0)
        os.kill(victim, signal.SIGKILL)
        assert _wait(lambda: httpx.get(url + "/health").json()["status"] == "degraded", timeout=20)
        _ok(url)  # sent while r0 is down: routed to r1
        assert _wait(lambda: httpx.get(url + "/health").json()["status"] == "ok", timeout=120)
        time.sleep(1.0)
    assert load.codes and set(load.codes) <= {200, 503}, sorted(set(load.codes))
    assert 503 in load.codes  # the requests in flight on r0: a clear, retryable answer
    assert all(ra and int(ra) > 0 for ra in load.retry_after_503)  # streams get an error event instead
    assert load.codes[-4:] == [200] * 4
    assert _wait(lambda: _status(system)["state"] == "ready" and _status(system)["replicas"][0]["pid"] != victim)
    rows = [json.loads(line) for line in (system["run_dir"] / "history.jsonl").read_text().splitlines()]
    assert any(r.get("replicas_up") == 1 for r in rows) and rows[-1]["replicas_up"] == 2  # it kept ticking
    metrics = httpx.get(url + "/metrics").text
    assert 'tide_replica_restarts_total{replica="r0"} 1.0' in metrics


def test_forged_weights_are_refused_and_published_ones_kept_in_the_run_folder(system):
    client = connect(local_url(system["run_dir"] / "redis"))
    target = load_target(ModelConfig(source=str(system["model_dir"]), dtype="float32"))
    head = new_head(target, 100_000, seed=11)
    forged = RedisWeightChannel(client, "tide", key=b"not the key")
    forged.publish(6, state_to_bytes(head), {"published_at": time.time()})
    assert _wait(lambda: all(r["swaps_rejected"] >= 1 and "signature" in r["last_swap_error"]
                             for r in _status(system)["replicas"]))
    assert all(r["draft_version"] == 0 for r in _status(system)["replicas"])
    RedisWeightChannel(client, "tide", key=WEIGHTS_KEY.encode()).publish(
        7, state_to_bytes(head), {"published_at": time.time()})
    assert _wait(lambda: all(r["draft_version"] == 7 for r in _status(system)["replicas"]))
    drafts = system["run_dir"] / "drafts"
    assert _wait(lambda: (drafts / "v7.safetensors").exists() and _status(system)["kept_draft"] == 7)
    assert json.loads((drafts / "v7.json").read_text())["model_source"] == str(system["model_dir"])
    _ok(system["url"])


def test_redis_killed_serving_never_fails_records_dropped_then_it_comes_back(system):
    url, run_dir = system["url"], system["run_dir"]
    redis_pid = json.loads((run_dir / "redis" / "redis.pid").read_text())["pid"]
    dropped = sum(r["records_dropped"] for r in _status(system)["replicas"])
    with Load(url, clients=2, max_tokens=16) as load:
        time.sleep(1.0)
        os.kill(redis_pid, signal.SIGKILL)
        assert _wait(lambda: _status(system)["redis_restarts"] == 1, timeout=30)
        time.sleep(3.0)
    assert load.codes and set(load.codes) == {200}
    st = _status(system)
    assert sum(r["records_dropped"] for r in st["replicas"]) > dropped  # counted, not lost silently
    written = sum(r["records_written"] for r in st["replicas"])
    _ok(url)
    assert _wait(lambda: sum(r["records_written"] for r in _status(system)["replicas"]) > written, timeout=30)
    # what Redis lost, the run folder had: the kept draft is published again
    channel = RedisWeightChannel(connect(local_url(run_dir / "redis")), "tide", key=WEIGHTS_KEY.encode())
    assert channel.latest_version() == 7 and channel.fetch(7) is not None


def test_the_trainer_killed_serving_goes_on_and_it_resumes_from_the_kept_draft(system):
    st = _status(system)
    pid = st["trainer"]["pid"]
    os.kill(pid, signal.SIGKILL)
    _ok(system["url"])
    assert _wait(lambda: _status(system)["trainer"].get("pid") not in (None, pid), timeout=120)
    assert _status(system)["trainer"]["version"] == 7


def test_tide_down_after_the_controller_crashed_stops_what_it_left(system):
    run_dir, env = system["run_dir"], system["env"]
    rec = json.loads((run_dir / "tide.pid").read_text())
    redis_pid = json.loads((run_dir / "redis" / "redis.pid").read_text())["pid"]
    os.kill(rec["pid"], signal.SIGKILL)
    assert _wait(lambda: process_start_time(redis_pid) is None, timeout=20)  # it died with the controller
    st = tide_cli("status", "--run-dir", str(run_dir), env=env)
    assert st.returncode == 1 and "dead" in json.loads(st.stdout)["state"]
    down = tide_cli("down", "--run-dir", str(run_dir), env=env)
    assert down.returncode == 0, down.stderr
    assert _wait(lambda: not session_members(rec["sid"]), timeout=30)
    assert not (run_dir / "tide.pid").exists()
