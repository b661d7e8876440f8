"""The in-process coordinator harness: a fake trainer channel (the part of the socket server the coordinator
talks to), a real file:// store in tmp_path, injected clocks and a fresh registry. Time moves only when a
test moves it or when the coordinator sleeps between commit attempts (the injected sleep advances both
clocks at once). The ``make`` fixture (conftest.py) builds one; two over one store are two nodes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from spotd import protocol
from spotd.config import Config
from spotd.daemon.coordinator import Coordinator
from spotd.daemon.episode import Episode
from spotd.daemon.ipc import Session
from spotd.daemon.sinks import Sinks
from spotd.errors import UploadError
from spotd.events import InstanceIdentity, Notice, NoticeKind, Phase
from spotd.metrics import Metrics
from spotd.store import CommitInfo, Manifest, Priority
from spotd.store.file import FileStore

JOB = "test-job"
T0 = datetime(2026, 11, 25, 4, 0, 0, tzinfo=UTC)
MARGIN_S = 10.0
GRACE_S = 30.0
DRILL_S = 300.0
#: Bounds a test's wait for something the coordinator does on its own tasks; never reached when it works.
WAIT_S = 10.0


class FakeTime:
    """The coordinator's clocks: monotonic seconds and UTC wall time, moving together and only when told.

    ``sleep`` (between commit attempts) moves them itself; ``sleep_until`` (an episode's close) waits for
    whoever moves them next to get there.
    """

    def __init__(self) -> None:
        self.elapsed = 0.0
        self.slept: list[float] = []
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return 5000.0 + self.elapsed

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.elapsed)

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds
        for target, future in list(self._waiters):
            if target <= self.monotonic() and not future.done():
                future.set_result(None)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)

    async def sleep_until(self, target: float) -> None:
        if target <= self.monotonic():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, future)
        self._waiters.append(entry)
        try:
            await future
        finally:
            self._waiters.remove(entry)


class FakeChannel:
    """What the coordinator needs of the socket server: the trainer sessions, send and broadcast.

    Like the real server it holds every session (``spotd status`` connects as role "control") and counts
    and broadcasts to the trainers among them. Every frame is encoded as the real server would (so an
    unsendable frame fails here too) and kept per session; a test awaits the next frame of an op with
    :meth:`next`.
    """

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.frames: dict[str, list[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()

    @property
    def trainers(self) -> list[Session]:
        return [s for s in self.sessions if s.role == "trainer"]

    def connect(
        self, name: str, *, rank: int | None = None, role: str = "trainer", **placement: Any
    ) -> Session:
        """``placement``: world_size, local_rank, local_world_size, node_rank, run_id, as hello says them."""
        session = Session(
            id=uuid.uuid4().hex[:12],
            role=role,
            name=name,
            pid=4242,
            rank=rank,
            world_size=placement.pop("world_size", None),
            peer_pid=4242,
            peer_uid=1000,
            peer_gid=1000,
            connected_at=0.0,
            **placement,
        )
        self.sessions.append(session)
        self.frames[session.id] = []
        return session

    def disconnect(self, session: Session) -> None:
        self.sessions.remove(session)

    async def send(self, session: Session, message: dict[str, Any]) -> bool:
        protocol.encode(message)
        if session not in self.sessions:
            return False
        await self._record(session, message)
        return True

    async def broadcast(self, message: dict[str, Any]) -> int:
        protocol.encode(message)
        for session in self.trainers:
            await self._record(session, message)
        return len(self.trainers)

    async def _record(self, session: Session, message: dict[str, Any]) -> None:
        async with self._changed:
            self.frames[session.id].append(message)
            self._changed.notify_all()

    def ops(self, session: Session) -> list[str]:
        return [f["op"] for f in self.frames[session.id]]

    async def next(self, session: Session, op: str) -> dict[str, Any]:
        """The first frame of ``op`` sent to ``session``, waiting for it if it has not been sent yet."""

        def found() -> list[dict[str, Any]]:
            return [f for f in self.frames[session.id] if f["op"] == op]

        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(found)
            return found()[0]


class FlakyStore(FileStore):
    """A real file store whose first ``failures`` commits raise, as an S3 outage would."""

    def __init__(self, *, failures: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.calls = 0

    async def commit(
        self,
        source: Path,
        *,
        checkpoint_dir: Path,
        info: CommitInfo,
        priority: Priority = Priority.BACKGROUND,
        progress: Callable[[int], None] | None = None,
    ) -> Manifest:
        self.calls += 1
        if self.calls <= self.failures:
            raise UploadError(f"simulated outage, commit {self.calls} of {source.name}")
        return await super().commit(
            source, checkpoint_dir=checkpoint_dir, info=info, priority=priority, progress=progress
        )


@dataclass
class Harness:
    coordinator: Coordinator
    channel: FakeChannel
    time: FakeTime
    registry: CollectorRegistry
    checkpoint_dir: Path
    store_root: Path
    store: FileStore

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def save(
        self, session: Session, step: int, request_id: str | None, *, after_s: float = 1.0
    ) -> Path:
        """The trainer writes a checkpoint ``after_s`` into its work and reports it, as spotd.client would."""
        self.time.advance(after_s)
        rel = f"{session.name}/step-{step:06d}.pt"
        path = self.checkpoint_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"w" * 4096)
        frame = {"op": "saved", "request_id": request_id, "path": rel, "step": step}
        await self.coordinator.on_saved(session, protocol.validate_client_frame(frame))
        return path

    async def settle(self) -> None:
        """Wait until the coordinator's own tasks are done (the events/ record is written after closing)."""
        await self.coordinator.drain(grace_s=WAIT_S)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.store_root / JOB / "events").glob("*.json"))]


def block_commits(store_root: Path) -> None:
    """Make every commit into this file store fail: its checkpoints directory is a file (root or not)."""
    (store_root / JOB).mkdir(parents=True, exist_ok=True)
    (store_root / JOB / "checkpoints").write_text("not a directory")


def spot(wall: datetime, *, in_s: float, action: str = "terminate") -> Notice:
    return Notice(
        kind=NoticeKind.SPOT,
        action=action,
        key=f"spot:{action}",
        detected_at=wall,
        final=True,
        not_after=wall + timedelta(seconds=in_s),
    )


def shutdown(wall: datetime) -> Notice:
    return Notice(
        kind=NoticeKind.SHUTDOWN,
        action="sigterm",
        key="shutdown",
        detected_at=wall,
        final=True,
        not_after=wall + timedelta(seconds=GRACE_S),
    )


async def closed(episode: Episode) -> Episode:
    async with asyncio.timeout(WAIT_S):
        await episode.closed.wait()
    return episode


def build_harness(
    tmp_path: Path,
    built: list[Harness],
    *,
    store_class: type[FileStore] = FileStore,
    checkpoint: str = "ckpt",
    sinks: Sinks | None = None,
    **store_kwargs: Any,
) -> Harness:
    """``checkpoint``: the checkpoint_dir's name in tmp_path (two nodes need two); the store is shared."""
    checkpoint_dir = tmp_path / checkpoint
    checkpoint_dir.mkdir(exist_ok=True)
    store_root = tmp_path / "store"
    cfg = Config().replace(
        **{
            "job_id": JOB,
            "checkpoint_dir": str(checkpoint_dir),
            "store.uri": store_root.as_uri(),
            "policy.deadline_margin": MARGIN_S,
            "policy.shutdown_grace": GRACE_S,
            "policy.drill_timeout": DRILL_S,
        }
    )
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    store = store_class(uri=cfg.store.uri, job_id=JOB, metrics=metrics, **store_kwargs)
    clock = FakeTime()
    coordinator = Coordinator(
        config=cfg,
        store=store,
        metrics=metrics,
        identity=InstanceIdentity("i-0test", "g5.xlarge", "us-east-1a", "spot"),
        clock=clock.monotonic,
        wall=clock.wall,
        sleep=clock.sleep,
        sleep_until=clock.sleep_until,
        sinks=sinks,
    )
    channel = FakeChannel()
    coordinator.attach(channel)
    coordinator.set_phase(Phase.TRAINING)
    harness = Harness(coordinator, channel, clock, registry, checkpoint_dir.resolve(), store_root, store)
    built.append(harness)
    return harness
