"""`tide up` / `tide down` / `tide status`: a detached controller process per run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def read_status(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def up(run_dir: Path, config: str | None, overrides: list[str], timeout_s: float = 600) -> int:
    pid_file = run_dir / "tide.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text() or 0)):
        print(f"tide is already running from {run_dir} (pid {pid_file.read_text()}); `tide down` first",
              file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").unlink(missing_ok=True)
    (run_dir / "history.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tide.cli", "up", "--foreground", "--run-dir", str(run_dir)]
    if config:
        cmd += ["--config", config]
    log = open(run_dir / "controller.log", "ab")
    proc = subprocess.Popen([*cmd, *overrides], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"starting tide (pid {proc.pid}); logs: {run_dir / 'controller.log'}", file=sys.stderr)
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            print(f"tide failed to start (exit {proc.returncode}); last log lines:", file=sys.stderr)
            print("".join((run_dir / "controller.log").read_text().splitlines(True)[-25:]), file=sys.stderr)
            return 1
        st = read_status(run_dir)
        if st and st.get("state") != last:
            last = st["state"]
            print(f"  {last} ...", file=sys.stderr)
        if st and st.get("state") == "ready":
            print(json.dumps({k: st[k] for k in ("state", "pid", "http", "redis", "run_dir")}, indent=2))
            return 0
        time.sleep(0.5)
    print(f"tide did not become ready in {timeout_s:.0f} s; see {run_dir / 'controller.log'}", file=sys.stderr)
    return 1


def down(run_dir: Path, timeout_s: float = 60) -> int:
    pid_file = run_dir / "tide.pid"
    if not pid_file.exists():
        print(f"nothing to stop in {run_dir}", file=sys.stderr)
        return 0
    pid = int(pid_file.read_text() or 0)
    if not _alive(pid):
        pid_file.unlink(missing_ok=True)
        print(f"tide (pid {pid}) was not running", file=sys.stderr)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):  # last resort: only the process group that `tide up` created
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    print(f"stopped tide (pid {pid})", file=sys.stderr)
    return 0


def status(run_dir: Path) -> int:
    st = read_status(run_dir)
    if st is None:
        print(json.dumps({"state": "not running", "run_dir": str(run_dir)}))
        return 1
    if st.get("state") == "ready" and not _alive(int(st.get("pid", 0))):
        st["state"] = "dead (controller exited without cleanup)"
    print(json.dumps(st, indent=2))
    return 0 if st.get("state") == "ready" else 1
