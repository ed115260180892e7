"""Published drafts kept in the run folder (`drafts/`), so that a `tide up` after `tide down`, a
trainer restart or a replica started later resumes from what served, not from the configured
draft: `v{N}.safetensors` (the head's weights) and `v{N}.json` (version, gate figures, what it
was trained for). The controller writes each version it sees published; the newest few are kept.
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
