"""Boot in process: a real Daemon against the IMDS simulator and a real store, stopped once it is ready.

Each test counts what one boot did: the restore observed once in spotd_restore_seconds, store.recovered
logged once.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from spotd.config import Config
from spotd.daemon import boot
from spotd.daemon.app import Daemon
from spotd.daemon.boot import committed_on_disk
from spotd.daemon.systemd import Notifier
from spotd.errors import StoreAccessError
from spotd.store import CommitInfo, Manifest
from spotd.store.file import FileStore
from tests.daemon.test_daemon_systemd import NotifyListener
from tests.fixtures.s3 import S3Bucket
from tests.util import async_wait_until

JOB = "test-job"


def config(tmp_path: Path, short_tmp: Path, imds_url: str, **overrides: Any) -> Config:
    return Config().replace(
        **{
            "job_id": JOB,
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "imds.endpoint": imds_url,
            "imds.poll_interval": 0.2,
            "imds.timeout": 0.5,
            "socket.path": str(short_tmp / "d.sock"),
            "metrics.listen": "",
            **overrides,
        }
    )


async def boot_once(cfg: Config) -> tuple[CollectorRegistry, list[dict[str, Any]]]:
    """Run a Daemon until it reports Training, then stop it; returns its registry and log events."""
    registry = CollectorRegistry()
    daemon = Daemon(config=cfg, registry=registry, notifier=Notifier(socket_path=""))
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(daemon.run())
        await async_wait_until(
            lambda: task.done() or registry.get_sample_value("spotd_phase", {"phase": "Training"}) == 1,
            timeout_s=30,
            what="the daemon ready",
        )
        daemon.request_stop()
        assert await asyncio.wait_for(task, 30) == 0, [e for e in logs if e["log_level"] == "error"]
    return registry, logs


async def test_one_boot_restore_is_observed_once(imds_sim, tmp_path, short_tmp):
    """A boot that restores one committed checkpoint leaves spotd_restore_seconds_count at 1 (the store observes it; boot no longer does too)."""
    store_uri = (tmp_path / "store").as_uri()
    source = tmp_path / "elsewhere"
    source.mkdir()
    (source / "model.pt").write_bytes(b"weights" * 100)
    seed = FileStore(uri=store_uri, job_id=JOB)
    info = CommitInfo(
        job_id=JOB,
        step=7,
        trainer="t",
        rank=None,
        world_size=None,
        request_id=None,
        reason="periodic",
        instance_id="i-old",
        final=False,
    )
    await seed.commit(source / "model.pt", checkpoint_dir=source, info=info)
    await seed.close()

    registry, logs = await boot_once(config(tmp_path, short_tmp, imds_sim.url, **{"store.uri": store_uri}))

    assert [e["event"] for e in logs if e["event"].startswith("restore.")] == ["restore.done"]
    assert (tmp_path / "ckpt" / "model.pt").read_bytes() == b"weights" * 100
    assert registry.get_sample_value("spotd_restore_seconds_count") == 1


async def test_store_recovered_is_logged_once_at_start(imds_sim, tmp_path, short_tmp, s3_bucket: S3Bucket):
    """A multipart upload a crash left behind is aborted at start and store.recovered is logged once, by the store."""
    s3_bucket.client.create_multipart_upload(Bucket=s3_bucket.name, Key=f"pfx/{JOB}/checkpoints/x/model.pt")
    cfg = config(
        tmp_path,
        short_tmp,
        imds_sim.url,
        **{"store.uri": s3_bucket.uri(), "store.endpoint_url": s3_bucket.endpoint_url},
    )

    _, logs = await boot_once(cfg)

    recovered = [e for e in logs if e["event"] == "store.recovered"]
    assert len(recovered) == 1 and recovered[0]["aborted_uploads"] == 1
    left = s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
    assert left == []


async def test_a_store_with_only_an_incomplete_step_is_a_fresh_start(imds_sim, tmp_path, short_tmp):
    """Rank 0's half of a 2-rank step (rank 1 never committed) is nothing to restore: the daemon starts, says so, and restores nothing, instead of exiting 1."""
    store_uri = (tmp_path / "store").as_uri()
    source = tmp_path / "elsewhere"
    source.mkdir()
    (source / "step-000000005-rank00000.pt").write_bytes(b"half")
    seed = FileStore(uri=store_uri, job_id=JOB)
    info = CommitInfo(
        job_id=JOB,
        step=5,
        trainer="t",
        rank=0,
        world_size=2,
        request_id=None,
        reason="periodic",
        instance_id="i-old",
        final=False,
    )
    await seed.commit(source / "step-000000005-rank00000.pt", checkpoint_dir=source, info=info)
    await seed.close()

    _, logs = await boot_once(config(tmp_path, short_tmp, imds_sim.url, **{"store.uri": store_uri}))

    assert [e["event"] for e in logs if e["event"].startswith("restore.")] == [
        "restore.incomplete_step",
        "restore.nothing",
    ]
    assert not (tmp_path / "ckpt" / "step-000000005-rank00000.pt").exists()


async def test_boot_restore_onto_a_full_disk_says_disk_full_once(imds_sim, tmp_path, short_tmp, small_disk):
    """A boot whose checkpoint_dir has no room exits 1 at once with the disk-full message and its fix (not store.uri and credentials), without retrying or trying an older checkpoint."""
    from tests.fixtures.disk import fill

    store_uri = (tmp_path / "store").as_uri()
    source = tmp_path / "elsewhere"
    source.mkdir()
    seed = FileStore(uri=store_uri, job_id=JOB)
    for step, size in ((1, 1024), (2, 4 * 1024 * 1024)):
        (source / "model.pt").write_bytes(b"w" * size)
        info = CommitInfo(
            job_id=JOB,
            step=step,
            trainer="t",
            rank=None,
            world_size=None,
            request_id=None,
            reason="periodic",
            instance_id="i-old",
            final=False,
        )
        await seed.commit(source / "model.pt", checkpoint_dir=source, info=info)
    await seed.close()
    disk = small_disk(8)
    fill(disk, leave_bytes=1024 * 1024)
    cfg = config(tmp_path, short_tmp, imds_sim.url, **{"store.uri": store_uri, "checkpoint_dir": str(disk)})
    daemon = Daemon(config=cfg, registry=CollectorRegistry(), notifier=Notifier(socket_path=""))

    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(daemon.run(), 30) == 1

    (failed,) = [e for e in logs if e["event"] == "startup.store_failed"]
    assert failed["error"].startswith("disk full: need 4.0 MiB") and str(disk) in failed["error"]
    assert "free space" in failed["fix"] and "credentials" not in failed["fix"]
    assert not [e for e in logs if e["event"] in ("restore.retry", "restore.fallback")]
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def hf_checkpoint(root: Path, step: int) -> Path:
    """A Hugging Face Trainer checkpoint directory, trainer_state.json written last."""
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w" * 2048)
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return path


def manifests(store_root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(store_root.glob(f"{JOB}/checkpoints/*/MANIFEST.json"))]


async def test_watch_mode_does_not_upload_what_boot_restored(imds_sim, tmp_path, short_tmp):
    """In watch mode the checkpoint boot restored is known as committed: only the next one the trainer writes is uploaded, with the step its name carries."""
    store_root = tmp_path / "store"
    source = tmp_path / "elsewhere"
    seed = FileStore(uri=store_root.as_uri(), job_id=JOB)
    info = CommitInfo(
        job_id=JOB,
        step=500,
        trainer="watch",
        rank=None,
        world_size=None,
        request_id=None,
        reason="watch",
        instance_id="i-old",
        final=False,
    )
    await seed.commit(hf_checkpoint(source, 500), checkpoint_dir=source, info=info)
    await seed.close()
    cfg = config(
        tmp_path,
        short_tmp,
        imds_sim.url,
        **{"store.uri": store_root.as_uri(), "sync.mode": "watch", "sync.settle": 0.2},
    )
    registry = CollectorRegistry()
    daemon = Daemon(config=cfg, registry=registry, notifier=Notifier(socket_path=""))
    task = asyncio.create_task(daemon.run())
    try:
        await async_wait_until(
            lambda: task.done() or registry.get_sample_value("spotd_phase", {"phase": "Training"}) == 1,
            timeout_s=30,
            what="the daemon ready",
        )
        assert (tmp_path / "ckpt" / "checkpoint-500" / "trainer_state.json").is_file()
        hf_checkpoint(tmp_path / "ckpt", 600)
        # The commit is done (not just its MANIFEST.json written) once it is the newest durable step.
        await async_wait_until(
            lambda: registry.get_sample_value("spotd_last_durable_step") == 600,
            timeout_s=30,
            what="checkpoint-600 committed",
        )
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
    found = manifests(store_root)
    # (A stop while checkpoint-600's handover finishes may commit it once more: not what this is about.)
    tops = [{f["path"].split("/")[0] for f in m["files"]} for m in found]
    assert tops.count({"checkpoint-500"}) == 1, "checkpoint-500 is not uploaded again"
    assert tops[-1] == {"checkpoint-600"} and found[-1]["step"] == 600


async def test_entries_unchanged_since_their_commit_are_known_committed(tmp_path):
    """committed_on_disk finds every entry that is file for file a commit's and not modified since; a file written after its commit (or one file more) is news, unless it is the restored (trusted) one."""
    ckpt = tmp_path / "ckpt"
    store = FileStore(uri=(tmp_path / "store").as_uri(), job_id=JOB, keep=10)
    for step in (100, 200, 300, 400):
        info = CommitInfo(
            job_id=JOB,
            step=step,
            trainer="watch",
            rank=None,
            world_size=None,
            request_id=None,
            reason="watch",
            instance_id="i-old",
            final=False,
        )
        await store.commit(hf_checkpoint(ckpt, step), checkpoint_dir=ckpt, info=info)
    manifests = await store.list()
    await store.close()
    later = manifests[0].created_at.timestamp() + 60
    os.utime(ckpt / "checkpoint-300" / "model.safetensors", (later, later))  # rewritten after its commit
    (ckpt / "checkpoint-200" / "optimizer.pt").write_bytes(b"o")  # one file more than was committed
    (ckpt / "checkpoint-700").mkdir()

    assert committed_on_disk(ckpt, manifests, trusted=None) == {"checkpoint-100", "checkpoint-400"}
    restored = next(m for m in manifests if m.step == 300)
    assert committed_on_disk(ckpt, manifests, trusted=restored) == {
        "checkpoint-100",
        "checkpoint-300",
        "checkpoint-400",
    }


class FlakyStartStore(FileStore):
    """A real file store whose first ``failures`` calls at boot (check_access, then list) fail, as S3 or IAM
    trouble in the first seconds of an instance would."""

    def __init__(self, *, failures: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.calls = 0

    def _trouble(self, what: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreAccessError(
                f"{what}: AccessDenied (simulated, call {self.calls}); fix: the IAM policy"
            )

    async def check_access(self) -> None:
        self._trouble("check_access")
        await super().check_access()

    async def list(self) -> list[Manifest]:
        self._trouble("list")
        return await super().list()


def at_boot_of(store: FileStore, checkpoint_dir: Path) -> Callable[[], Awaitable[boot.StoreAtBoot]]:
    """What boot asks of the store, as app.py does it (without the job's ledger)."""

    async def attempt() -> boot.StoreAtBoot:
        await boot.prepare_store(store)
        return await boot.restore_on_start(
            store, checkpoint_dir=checkpoint_dir, enabled=True, notifier=Notifier(socket_path="")
        )

    return attempt


class BootTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_boot_waits_out_store_trouble_saying_why(tmp_path, short_tmp):
    """Store trouble at boot is retried with backoff, each time with a log line naming the error and the fix, STATUS= and EXTEND_TIMEOUT_USEC= to systemd; once the store answers, boot goes on."""
    store = FlakyStartStore(failures=3, uri=(tmp_path / "store").as_uri(), job_id=JOB)
    listener = NotifyListener(str(short_tmp / "notify"))
    time_ = BootTime()
    try:
        with structlog.testing.capture_logs() as logs:
            at_boot = await boot.retry_at_boot(
                at_boot_of(store, tmp_path / "ckpt"),
                notifier=Notifier(socket_path=listener.path),
                wait_s=300.0,
                clock=time_.clock,
                sleep=time_.sleep,
            )
        await async_wait_until(lambda: len(listener.messages) >= 3, what="three notifications")
    finally:
        listener.close()
        await store.close()
    assert at_boot.newest is None
    assert time_.slept == [1.0, 2.0, 4.0]
    retries = [e for e in logs if e["event"] == "startup.store_retry"]
    assert [r["attempt"] for r in retries] == [1, 2, 3]
    assert "AccessDenied" in retries[0]["error"] and "IAM policy" in retries[0]["fix"]
    assert retries[0]["gives_up_in_seconds"] == 300.0
    statuses = [f["STATUS"] for _, f in listener.messages if "STATUS" in f]
    assert statuses and "AccessDenied" in statuses[0] and "retrying in 1 s" in statuses[0]
    assert all("EXTEND_TIMEOUT_USEC" in f for _, f in listener.messages if "STATUS" in f)


async def test_boot_gives_up_after_boot_store_wait(tmp_path):
    """A store that never answers is retried for boot_store_wait seconds, never longer, then the last error is raised for the caller to exit 1."""
    store = FlakyStartStore(failures=10**6, uri=(tmp_path / "store").as_uri(), job_id=JOB)
    time_ = BootTime()
    try:
        with pytest.raises(StoreAccessError, match="AccessDenied"):
            await boot.retry_at_boot(
                at_boot_of(store, tmp_path / "ckpt"),
                notifier=Notifier(socket_path=""),
                wait_s=60.0,
                clock=time_.clock,
                sleep=time_.sleep,
            )
    finally:
        await store.close()
    assert time_.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0]
    assert sum(time_.slept) <= 60.0
