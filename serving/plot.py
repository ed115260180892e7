"""`tide plot`: acceptance length over time from a run's history.jsonl, draft swaps marked."""

from __future__ import annotations

import json
from pathlib import Path


def load_history(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return rows


def plot_history(rows: list[dict], out: Path, title: str = "tide: acceptance length over time",
                 smooth_s: float = 30.0, marks: list[tuple[float, str]] = ()) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["elapsed_s"], r["accept_len"]) for r in rows if r.get("accept_len") is not None]
    if not pts:
        raise ValueError("the history has no served traffic yet: nothing to plot")
    t = [p[0] / 60 for p in pts]
    a = [p[1] for p in pts]
    smooth = []  # trailing mean over smooth_s seconds
    for i, (ti, _) in enumerate(pts):
        win = [aj for tj, aj in pts[: i + 1] if tj >= ti - smooth_s]
        smooth.append(sum(win) / len(win))
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    ax.plot(t, a, ".", alpha=0.25, color="tab:blue", label="per second")
    ax.plot(t, smooth, "-", color="tab:blue", lw=2, label=f"{smooth_s:.0f} s mean")
    prev = None
    swaps = 0
    for r in rows:
        v = r.get("draft_version")
        if prev is not None and v != prev:
            ax.axvline(r["elapsed_s"] / 60, color="tab:green", alpha=0.5, lw=1)
            ax.text(r["elapsed_s"] / 60, ax.get_ylim()[1], f"v{v}", fontsize=7, color="tab:green",
                    va="top", ha="left")
            swaps += 1
        prev = v
    # drift as the trainer reported it each tick: where the flag turns on
    drifts = [r["elapsed_s"] for p, r in zip([{}, *rows], rows) if r.get("drift") and not p.get("drift")]
    for x in drifts:
        ax.axvline(x / 60, color="tab:orange", ls=":", lw=1.5)
    if drifts:
        ax.plot([], [], ":", color="tab:orange", lw=1.5, label="drift detected")
    for at, label in marks:
        ax.axvline(at / 60, color="tab:red", ls="--", lw=1.5)
        ax.text(at / 60, min(a), " " + label, color="tab:red", fontsize=8)
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("acceptance length (accepted + 1 per verify pass)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return {"points": len(pts), "swaps": swaps, "drifts": len(drifts), "first": smooth[0], "last": smooth[-1],
            "png": str(out)}
