"""Watch mode (``[sync] mode = "watch"``): commit what appears in checkpoint_dir, for scripts without the
client.

Polling, no inotify: every ``interval_s`` the top-level entries of checkpoint_dir are fingerprinted (size and
mtime of every file). An entry is handed to ``on_ready`` once it is *complete* and its fingerprint has not
changed for ``settle_s``, and again only after it changes. Temp names (``.*``, ``tmp-*``, ``*.tmp``,
``*.partial``) are skipped. Deletions are never mirrored: a vanished entry is just forgotten.

Complete means, for the writers we know, that the file they write last is there:
- a Hugging Face Trainer ``checkpoint-N/`` directory: ``trainer_state.json`` (written after the weights,
  optimizer, scheduler and RNG state);
- a torch.distributed.checkpoint directory (``*.distcp`` shards): ``.metadata``;
- a single file (a Lightning ``.ckpt``, a ``torch.save``): the settle time alone.
For any other directory only the settle time says so: a writer that pauses longer than ``settle`` between
two files of one checkpoint must write it under a temp name and rename it when done.

On a notice the coordinator calls :meth:`Watcher.flush`: a scan at once whose settled entries go to the
episode's own handover (an emergency commit) instead of waiting for the next poll; it says which entries were
still settling.

Entries that become ready together are handed over oldest first: by the training step in the name
(``checkpoint-500``, ``epoch=3-step=1200.ckpt``, ``step-000500``, ``global_step500``), else by modification
time, so the last commit is the newest checkpoint. Entries the store already holds as they are on disk (what
boot restored, and older commits not modified since: :func:`spotd.daemon.boot.committed_on_disk`) are known
as committed and not uploaded again until they change.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from spotd.logs import get_logger

__all__ = ["Flushed", "Handover", "Watcher", "is_temp_name", "step_from_name"]

log = get_logger("spotd.watch")

Fingerprint = tuple[tuple[str, int, int], ...]
#: Takes one ready entry to the store; raising means "not committed", so the entry is offered again.
Handover = Callable[[Path], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Flushed:
    """What one :meth:`Watcher.flush` did."""

    handed: tuple[Path, ...]  # committed now, oldest first
    settling: tuple[str, ...]  # complete but changed within settle_s: committed once they settle


#: The last match wins: ``epoch=3-step=1200`` is step 1200.
_STEP_RE: Final = re.compile(r"(?:checkpoint|step|global_step)[-_=]?(\d+)", re.IGNORECASE)
#: Hugging Face Trainer checkpoints and the file it writes last.
_HF_DIR_RE: Final = re.compile(r"^checkpoint-\d+$")
HF_LAST_FILE: Final = "trainer_state.json"


def is_temp_name(name: str) -> bool:
    return name.startswith((".", "tmp-", "tmp_")) or name.endswith((".tmp", ".partial"))


def step_from_name(name: str) -> int | None:
    """The training step a checkpoint's name carries, if it carries one."""
    matches = _STEP_RE.findall(name)
    return int(matches[-1]) if matches else None


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
    if not out or not _complete(path.name, {rel for rel, _, _ in out}):
        return None
    return tuple(sorted(out))


def _complete(name: str, files: set[str]) -> bool:
    """Whether a directory holds the file its writer writes last (see the module docstring)."""
    top = {rel for rel in files if "/" not in rel}
    if _HF_DIR_RE.match(name) and HF_LAST_FILE not in top:
        return False
    leaves = {rel.rsplit("/", 1)[-1] for rel in files}
    # DCP writes .metadata last; shards alone are an unfinished save.
    return not (any(n.endswith(".distcp") for n in leaves) and ".metadata" not in leaves)


class Watcher:
    __slots__ = (
        "_checkpoint_dir",
        "_clock",
        "_committed",
        "_handed",
        "_interval_s",
        "_lock",
        "_on_ready",
        "_seen",
        "_settle_s",
    )

    def __init__(
        self,
        *,
        checkpoint_dir: Path,
        settle_s: float,
        on_ready: Handover,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 1.0,
        committed: Collection[str] = (),
    ) -> None:
        """``committed``: top-level names already in the store as they are on disk (boot says which)."""
        self._checkpoint_dir = checkpoint_dir
        self._settle_s = settle_s
        self._on_ready = on_ready
        self._clock = clock
        self._interval_s = interval_s
        self._seen: dict[str, tuple[Fingerprint, float]] = {}  # name → (fingerprint, unchanged since)
        self._handed: dict[str, Fingerprint] = {}
        self._committed = set(committed)  # fingerprinted into _handed on the first scan that sees them
        # One scan-and-handover at a time: a flush on a notice must not hand over what the loop is handing.
        self._lock = asyncio.Lock()

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
        async with self._lock:
            handed, _ = await self._poll(self._on_ready)
        return handed

    async def flush(self, handover: Handover) -> Flushed:
        """A scan now (a notice came): every settled entry not yet committed goes to ``handover``, oldest
        first. An entry still changing is not committed half-written; it is named in ``settling``."""
        async with self._lock:
            handed, settling = await self._poll(handover)
        return Flushed(handed=tuple(handed), settling=tuple(settling))

    async def _poll(self, handover: Handover) -> tuple[list[Path], list[str]]:
        current = await asyncio.get_running_loop().run_in_executor(None, self._scan)
        now = self._clock()
        for name in list(self._seen):
            if name not in current:  # deleted: forget it, never mirror it
                del self._seen[name]
                self._handed.pop(name, None)
        for name in self._committed & current.keys():
            # Restored from the store: the same bytes are committed already; only a change is news.
            self._handed[name] = current[name]
            self._committed.discard(name)
        due: list[str] = []
        settling: list[str] = []
        for name, fp in current.items():
            previous = self._seen.get(name)
            if previous is None or previous[0] != fp:
                self._seen[name] = (fp, now)
                previous = self._seen[name]
            if self._handed.get(name) == fp:
                continue
            if now - previous[1] >= self._settle_s:
                due.append(name)
            else:
                settling.append(name)
        ready: list[Path] = []
        for name in sorted(due, key=lambda n: self._age_key(n, current[n])):
            fp = current[name]
            path = self._checkpoint_dir / name
            try:
                await handover(path)
            except Exception as exc:  # a failed upload is retried once the entry settles again
                log.warning("watch.handover_failed", path=str(path), error=str(exc))
                self._seen[name] = (fp, now)
                continue
            self._handed[name] = fp
            ready.append(path)
        return ready, sorted(settling)

    @staticmethod
    def _age_key(name: str, fp: Fingerprint) -> tuple[int, int, int]:
        """Older first: entries without a step by mtime, then stepped ones by step (the newest goes last)."""
        step = step_from_name(name)
        newest_mtime = max(mtime for _, _, mtime in fp)
        return (0, 0, newest_mtime) if step is None else (1, step, newest_mtime)

    async def run(self) -> None:
        """Poll until cancelled."""
        log.info("watch.started", checkpoint_dir=str(self._checkpoint_dir), settle_s=self._settle_s)
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval_s)
