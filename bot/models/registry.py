"""The adapter registry: every trained adapter version, and which one is in service.

Layout under the data directory, chosen so each version folder is a plain peft adapter that
vLLM's ``--lora-modules`` (or ``PeftModel.from_pretrained``) loads unchanged::

    adapters/<name>/<version>/adapter_config.json, adapter_model.safetensors, chinwag.json
    adapters/<name>/CURRENT        the version in service (one line)
    adapters/<name>/history.jsonl  every promotion and rollback, oldest first

Writers (trainers, ``chinwag adapters promote``) and readers (the running bot) are different
processes, so every change is a write-to-temporary, fsync, rename: a crash at any point leaves
either the old or the new state, never a half-written one. The bot notices a promotion by the
``CURRENT`` file changing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.files import atomic_write, fsync_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = re.compile(r"^v(\d+)$")
META_FILE = "chinwag.json"


class RegistryError(Exception):
    """A registry operation that cannot be done (unknown adapter or version, bad name)."""


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    name: str
    version: str
    path: Path
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "generative"))


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> AdapterRegistry:
        return cls(Path(data_dir) / "adapters")

    def _dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise RegistryError(f"invalid adapter name {name!r}")
        return self.root / name

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[AdapterVersion]:
        base = self._dir(name)
        if not base.is_dir():
            return []
        found = []
        for p in base.iterdir():
            m = _VERSION.match(p.name)
            if m and p.is_dir() and (p / META_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [self._load(name, p) for _, p in sorted(found)]

    def _load(self, name: str, path: Path) -> AdapterVersion:
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path / META_FILE}: unreadable ({exc})") from None
        return AdapterVersion(name, path.name, path, meta)

    def get(self, name: str, version: str) -> AdapterVersion:
        path = self._dir(name) / version
        if not _VERSION.match(version) or not (path / META_FILE).is_file():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise RegistryError(f"adapter {name!r} has no version {version!r} (known: {known})")
        return self._load(name, path)

    def current(self, name: str) -> AdapterVersion | None:
        """The version in service, or ``None`` when none was ever promoted."""
        try:
            version = (self._dir(name) / "CURRENT").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return self.get(name, version) if version else None

    def stamp(self, name: str) -> float:
        """Changes whenever a promotion or rollback happens (the bot polls it)."""
        try:
            return (self._dir(name) / "CURRENT").stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def publish(
        self, name: str, write: Callable[[Path], None], meta: dict[str, Any]
    ) -> AdapterVersion:
        """Store a new version: ``write(folder)`` saves the adapter; not promoted yet.

        The folder only appears under its version name once complete, so a crash mid-save
        leaves nothing but a temporary folder that the next publish clears away.
        """
        base = self._dir(name)
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=".tmp-"))
        try:
            write(tmp)
            numbers = [int(m.group(1)) for p in base.iterdir() if (m := _VERSION.match(p.name))]
            version = f"v{max(numbers, default=0) + 1}"
            meta = {
                **meta,
                "name": name,
                "version": version,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str), "utf-8")
            for f in tmp.iterdir():
                if f.is_file():
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
            target = base / version
            os.rename(tmp, target)
            fsync_dir(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._load(name, target)

    def annotate(self, name: str, version: str, fields: dict[str, Any]) -> AdapterVersion:
        """Add figures measured after publishing (a gate's scores) to a version's metadata.

        Written whole and atomically: a reader sees the old metadata or the new, never half.
        """
        entry = self.get(name, version)
        meta = {**entry.meta, **fields, "name": name, "version": version}
        atomic_write(entry.path / META_FILE, json.dumps(meta, indent=2, default=str))
        return self._load(name, entry.path)

    def promote(self, name: str, version: str, *, reason: str = "") -> AdapterVersion:
        entry = self.get(name, version)
        previous = self.current(name)
        atomic_write(self._dir(name) / "CURRENT", version + "\n")
        self._history(
            name,
            {
                "action": "promote",
                "version": version,
                "previous": previous.version if previous else None,
                "reason": reason,
            },
        )
        return entry

    def rollback(self, name: str) -> AdapterVersion:
        """Put the version that was in service before the current one back in service."""
        current = self.current(name)
        if current is None:
            raise RegistryError(f"adapter {name!r} has no version in service")
        # Replay the history as a stack: a promotion pushes, a rollback pops; so rolling back
        # twice from v3 goes to v2 and then v1, never back up to v3.
        stack: list[str] = []
        for h in self.history(name):
            if h.get("action") == "promote":
                stack.append(h["version"])
            elif h.get("action") == "rollback" and stack:
                stack.pop()
        while stack and stack[-1] == current.version:
            stack.pop()
        if not stack:
            raise RegistryError(f"adapter {name!r} has no earlier version to roll back to")
        target = stack[-1]
        atomic_write(self._dir(name) / "CURRENT", target + "\n")
        self._history(name, {"action": "rollback", "version": target, "previous": current.version})
        return self.get(name, target)

    def history(self, name: str) -> list[dict[str, Any]]:
        path = self._dir(name) / "history.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return out

    def _history(self, name: str, record: dict[str, Any]) -> None:
        record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        path = self._dir(name) / "history.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
