"""`tide up` / `tide down` / `tide status`: a detached controller process per run folder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _recorded(path: Path) -> dict | None:
    """{"pid", "start"[, "sid"]} from a pid file; None if there is none or it is unreadable."""
    try:
        rec = json.loads(path.read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _same_process(rec: dict | None) -> bool:
    """The recorded process is still running: same pid and same start time (not a reused pid)."""
    from tide.transport.redis_server import process_start_time

    if not rec or rec["pid"] <= 1 or rec.get("start") is None:
        return False
    return process_start_time(rec["pid"]) == rec["start"]


def session_members(sid: int) -> list[int]:
    """Live processes of a session: `tide up` starts the controller in a session of its own, and
    everything it starts but the embedded Redis (Ray's processes and workers) stays in it."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):  # zombies are gone already
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def read_status(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def running(run_dir: Path) -> bool:
    return _same_process(_recorded(run_dir / "tide.pid"))


def up(run_dir: Path, config: str | None, overrides: list[str], timeout_s: float = 600) -> int:
    rec = _recorded(run_dir / "tide.pid")
    if _same_process(rec):
        print(f"tide is already running from {run_dir} (pid {rec['pid']}); `tide down` first", file=sys.stderr)
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
    """Stop what `tide up` started from this run folder, and only that: the controller if the pid
    file names it (same pid and start time), else what a crashed one left (its process group,
    the embedded Redis)."""
    pid_file, redis_pid_file = run_dir / "tide.pid", run_dir / "redis" / "redis.pid"
    rec, redis_rec = _recorded(pid_file), _recorded(redis_pid_file)
    if rec is None and redis_rec is None:
        print(f"nothing to stop in {run_dir}", file=sys.stderr)
        pid_file.unlink(missing_ok=True)
        return 0
    if _same_process(rec):
        pid = rec["pid"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        while time.time() < deadline and _same_process(rec):
            time.sleep(0.2)
        if _same_process(rec):
            os.kill(pid, signal.SIGKILL)
        print(f"stopped tide (pid {pid})", file=sys.stderr)
    elif rec is not None:
        print(f"tide (pid {rec['pid']}) was not running", file=sys.stderr)
    # what a controller that died without cleaning up leaves: Ray's processes in its session
    sid = (rec or {}).get("sid")
    if isinstance(sid, int) and sid > 1 and not _same_process(rec) and (left := session_members(sid)):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_members(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 5
            while time.time() < deadline and session_members(sid):
                time.sleep(0.2)
        print(f"stopped {len(left)} process(es) the controller left running (session {sid})", file=sys.stderr)
    if _same_process(redis_rec):
        os.kill(redis_rec["pid"], signal.SIGTERM)
        print(f"stopped the embedded Redis (pid {redis_rec['pid']})", file=sys.stderr)
    pid_file.unlink(missing_ok=True)
    redis_pid_file.unlink(missing_ok=True)
    st = read_status(run_dir)
    if st is not None and st.get("state") not in ("stopped", None):
        st["state"] = "stopped"
        (run_dir / "status.json").write_text(json.dumps(st, indent=2))
    return 0


def status(run_dir: Path) -> int:
    st = read_status(run_dir)
    if st is None:
        print(json.dumps({"state": "not running", "run_dir": str(run_dir)}))
        return 1
    if st.get("state") in ("ready", "degraded", "starting") and not _same_process(_recorded(run_dir / "tide.pid")):
        st["state"] = "dead (controller exited without cleanup; `tide down` stops what it left)"
    print(json.dumps(st, indent=2))
    return 0 if st.get("state") in ("ready", "degraded") else 1
