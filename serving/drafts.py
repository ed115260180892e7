"""Published drafts kept in the run folder (`drafts/`), so that a `tide up` after `tide down`, a
trainer restart or a replica started later resumes from what served, not from the configured
draft: `v{N}.safetensors` (the head's weights) and `v{N}.json` (version, gate figures, what it
was trained for). The controller writes each version it sees published (it is the one process
with the run folder, wherever the trainer runs); the newest few are kept. At start, and after
the embedded Redis restarts, it publishes the newest kept one again when Redis has nothing newer:
replicas start from it and the trainer's gate compares candidates with it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)
_NAME = re.compile(r"^v(\d+)\.safetensors$")


class DraftStore:
    def __init__(self, folder: Path, keep: int = 3):
        self.folder, self.keep = Path(folder), keep

    def versions(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name)))

    def save(self, version: int, data: bytes, meta: dict) -> None:
        """Atomically (a reader never sees half a file), then the oldest beyond `keep` go."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in meta.items() if k != "hmac"}  # signed again when republished
        for name, payload in ((f"v{version}.safetensors", data), (f"v{version}.json", json.dumps(meta).encode())):
            tmp = self.folder / (name + ".tmp")
            tmp.write_bytes(payload)
            tmp.replace(self.folder / name)
        for old in self.versions()[: -self.keep]:
            for suffix in (".safetensors", ".json"):
                (self.folder / f"v{old}{suffix}").unlink(missing_ok=True)

    def newest(self, model: str, draft_path: str | None) -> tuple[int, bytes, dict] | None:
        """The newest kept draft trained for this model and starting draft, or None. A file
        that does not parse is skipped (the next older one is tried)."""
        from tide.checkpoint import WeightError, state_from_bytes

        for version in reversed(self.versions()):
            try:
                data = (self.folder / f"v{version}.safetensors").read_bytes()
                meta = json.loads((self.folder / f"v{version}.json").read_text())
                state_from_bytes(data)
            except (OSError, ValueError, WeightError) as e:
                log.warning("skipping kept draft v%d: %s", version, e)
                continue
            if meta.get("model_source") != model or meta.get("draft_path") != draft_path:
                log.info("kept draft v%d was trained for %s / %s, not this configuration; not resumed",
                         version, meta.get("model_source"), meta.get("draft_path"))
                return None
            return version, data, meta
        return None

    def resume(self, channel, model: str, draft_path: str | None) -> int:
        """Publish the newest kept draft for this setup on `channel` (a WeightChannel) unless it
        holds a newer one. Returns the kept version (0: none)."""
        from tide.transport.base import TransportError

        kept = self.newest(model, draft_path)
        if kept is None:
            return 0
        version, data, meta = kept
        try:
            if channel.latest_version() < version:
                channel.publish(version, data, meta)
                log.info("resuming from the kept draft v%d (%s)", version, self.folder)
        except TransportError as e:
            log.warning("could not republish the kept draft v%d: %s", version, e)
        return version

    def keep_newest(self, channel, kept: int, model: str, draft_path: str | None) -> int:
        """Save the channel's newest version if it is newer than `kept`. Returns the newest kept."""
        from tide.checkpoint import WeightError
        from tide.transport.base import TransportError

        try:
            latest = channel.latest_version()
            got = channel.fetch(latest) if latest > kept else None
        except (TransportError, WeightError) as e:
            log.debug("could not keep the newest draft: %s", e)
            return kept
        if got is None:
            return kept
        self.save(latest, got[0], {**got[1], "model_source": model, "draft_path": draft_path})
        return latest
