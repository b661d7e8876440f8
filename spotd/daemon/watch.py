"""Watch mode (``[sync] mode = "watch"``): commit what appears in checkpoint_dir, for scripts without the
client.

Polling, no inotify: every ``interval_s`` the top-level entries of checkpoint_dir are fingerprinted (size and
mtime of every file). An entry is handed to ``on_ready`` once its fingerprint has not changed for
``settle_s``, and again only after it changes. Temp names (``*.tmp``, ``.*``, ``*.partial``) are skipped. A
torch.distributed.checkpoint directory (``*.distcp`` shards) is ready only once its ``.metadata`` exists,
which DCP writes last. Deletions are never mirrored: a vanished entry is just forgotten.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from spotd.logs import get_logger

__all__ = ["Watcher", "is_temp_name"]

log = get_logger("spotd.watch")

Fingerprint = tuple[tuple[str, int, int], ...]


def is_temp_name(name: str) -> bool:
    return name.startswith(".") or name.endswith((".tmp", ".partial"))


def _fingerprint(path: Path) -> Fingerprint | None:
    """(relative path, size, mtime_ns) of every file; None while the entry is not ready by construction."""
    try:
        if path.is_file():
            st = path.stat()
            return (("", st.st_size, st.st_mtime_ns),)
        if not path.is_dir():
            return None
        out: list[tuple[str, int, int]] = []
        for dirpath, _dirs, filenames in os.walk(path):
            for name in filenames:
                p = Path(dirpath, name)
                st = p.stat()
                out.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    except FileNotFoundError:  # deleted or renamed between listing and stat: look again next poll
        return None
    names = {rel.rsplit("/", 1)[-1] for rel, _, _ in out}
    if any(n.endswith(".distcp") for n in names) and ".metadata" not in names:
        return None  # DCP writes .metadata last; shards alone are an unfinished save
    if not out:
        return None
    return tuple(sorted(out))


class Watcher:
    __slots__ = ("_checkpoint_dir", "_clock", "_handed", "_interval_s", "_on_ready", "_seen", "_settle_s")

    def __init__(
        self,
        *,
        checkpoint_dir: Path,
        settle_s: float,
        on_ready: Callable[[Path], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 1.0,
    ) -> None:
        self._checkpoint_dir = checkpoint_dir
        self._settle_s = settle_s
        self._on_ready = on_ready
        self._clock = clock
        self._interval_s = interval_s
        self._seen: dict[str, tuple[Fingerprint, float]] = {}  # name → (fingerprint, unchanged since)
        self._handed: dict[str, Fingerprint] = {}

    def _scan(self) -> dict[str, Fingerprint]:
        out: dict[str, Fingerprint] = {}
        try:
            entries = list(os.scandir(self._checkpoint_dir))
        except FileNotFoundError:
            return out
        for entry in entries:
            if is_temp_name(entry.name):
                continue
            fp = _fingerprint(Path(entry.path))
            if fp is not None:
                out[entry.name] = fp
        return out

    async def poll_once(self) -> list[Path]:
        """One scan; hands over and returns the entries that became ready."""
        current = await asyncio.get_running_loop().run_in_executor(None, self._scan)
        now = self._clock()
        for name in list(self._seen):
            if name not in current:  # deleted: forget it, never mirror it
                del self._seen[name]
                self._handed.pop(name, None)
        ready: list[Path] = []
        for name, fp in current.items():
            previous = self._seen.get(name)
            if previous is None or previous[0] != fp:
                self._seen[name] = (fp, now)
                continue
            if now - previous[1] >= self._settle_s and self._handed.get(name) != fp:
                path = self._checkpoint_dir / name
                try:
                    await self._on_ready(path)
                except Exception as exc:  # a failed upload is retried once the entry settles again
                    log.warning("watch.handover_failed", path=str(path), error=str(exc))
                    self._seen[name] = (fp, now)
                    continue
                self._handed[name] = fp
                ready.append(path)
        return ready

    async def run(self) -> None:
        """Poll until cancelled."""
        log.info("watch.started", checkpoint_dir=str(self._checkpoint_dir), settle_s=self._settle_s)
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval_s)
