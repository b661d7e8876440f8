"""Multi-rank saves in process: one step's saves of every local rank commit as this node's part of one
checkpoint, and trainers hear ``durable`` only once every node's part is there.

The same harness as test_coordinator.py (fake trainer channel, real file:// store, injected clocks); two
nodes are two coordinators with their own checkpoint_dir over one store, as two daemons are.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import structlog

from spotd import protocol
from spotd.cli import render_status
from spotd.daemon.ipc import Session
from spotd.daemon.sinks import Sinks
from spotd.events import Phase, SessionEvent, SessionEventKind
from spotd.store.selection import run_checkpoint_name
from tests.daemon.harness import WAIT_S, Harness, closed, spot

RUN = "20261201T190000Z-abc123"


def rank(h: Harness, r: int, *, world: int = 2, local: int = 2, run: str = RUN, **extra: Any) -> Session:
    return h.channel.connect(
        f"train-r{r}",
        rank=r,
        world_size=world,
        local_world_size=local,
        local_rank=r % local,
        node_rank=r // local,
        run_id=run,
        **extra,
    )


async def save(
    h: Harness, session: Session, step: int, request_id: str | None, *, path: str | None = None, **flags: Any
) -> None:
    """Write this rank's file of ``step`` and report it, as spotd.torch.Checkpointer does."""
    rel = path or f"run/step-{step:06d}-rank{session.rank}.pt"
    target = h.checkpoint_dir / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes([session.rank or 0]) * 1000)
    frame = {"op": "saved", "request_id": request_id, "path": rel, "step": step, **flags}
    await h.coordinator.on_saved(session, protocol.validate_client_frame(frame))


def committed(h: Harness) -> list[dict[str, Any]]:
    return [
        json.loads(p.read_text())
        for p in sorted((h.store_root / "test-job" / "checkpoints").glob("*/MANIFEST.json"))
    ]


async def advance_until(h: Harness, done: Any, *, step_s: float = 0.5) -> None:
    """Move the clocks (the coordinator polls the store between them) until ``done()``."""
    async with asyncio.timeout(WAIT_S):
        while not done():
            h.time.advance(step_s)
            await asyncio.sleep(0.01)


async def test_the_ranks_of_one_node_commit_one_checkpoint_once_both_saved(make):
    """Rank 0's save alone commits nothing and answers nothing; with rank 1's the step is one checkpoint named after the run and the step, holding both files, and both ranks hear durable."""
    h = make()
    r0, r1 = rank(h, 0), rank(h, 1)
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    await save(h, r0, 40, episode.request_id)
    await asyncio.sleep(0.05)
    assert committed(h) == [] and h.channel.ops(r0) == ["checkpoint"]
    await save(h, r1, 40, episode.request_id)
    d0, d1 = await h.channel.next(r0, "durable"), await h.channel.next(r1, "durable")
    await closed(episode)
    await h.settle()

    name = run_checkpoint_name(RUN, 40)
    assert d0["name"] == d1["name"] == name and d0["path"] == "run/step-000040-rank0.pt"
    (manifest,) = committed(h)
    assert manifest["name"] == name and manifest["world_size"] == 2 and manifest["nodes"] == 1
    assert [f["path"] for f in manifest["files"]] == ["run/step-000040-rank0.pt", "run/step-000040-rank1.pt"]
    assert h.coordinator.phase is Phase.COMPLETED and episode.lost() == []
    assert (h.store_root / "test-job" / "LATEST").read_text().strip() == name


async def test_a_rank_stopped_by_the_agreement_before_its_request_arrived_answers_the_episode(make):
    """A rank the agreement stopped saves with no request id (final, another rank was asked first): that is its answer to the open episode, which ends Completed, not Stopped for a rank that 'never saved'."""
    h = make()
    r0, r1 = rank(h, 0), rank(h, 1)
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    await save(h, r0, 7, episode.request_id)
    await save(h, r1, 7, None, final=True, reason="final")
    await h.channel.next(r1, "durable")
    await closed(episode)
    await h.settle()
    assert episode.lost() == [] and h.coordinator.phase is Phase.COMPLETED
    assert sorted(s.trainer for s in episode.durable()) == ["train-r0", "train-r1"]


async def test_two_nodes_commit_once_and_the_first_node_answers_only_after_the_second(make):
    """2 nodes x 2 ranks over one store, only node 0 notified: node 0's part alone is not a checkpoint and its ranks hear nothing; node 1's ranks save as peers (final, no request), node 1 writes the global manifest, and node 0 learns it and answers durable. One global commit, four files."""
    n0, n1 = make(checkpoint="node0"), make(checkpoint="node1")
    a0, a1 = rank(n0, 0, world=4), rank(n0, 1, world=4)
    b2, b3 = rank(n1, 2, world=4), rank(n1, 3, world=4)
    episode = await n0.coordinator.handle_notice(spot(n0.time.wall(), in_s=120))
    assert episode is not None
    with structlog.testing.capture_logs() as logs:
        await save(n0, a0, 90, episode.request_id)
        await save(n0, a1, 90, episode.request_id)
        await advance_until(n0, lambda: any(e["event"] == "checkpoint.part_durable" for e in logs))
    assert committed(n0) == [] and "durable" not in n0.channel.ops(a0)
    (waiting,) = [e for e in logs if e["event"] == "checkpoint.part_durable"]
    assert waiting["waiting_for_nodes"] == [1]

    await save(n1, b2, 90, None, final=True, reason="final")
    await save(n1, b3, 90, None, final=True, reason="final")
    await n1.channel.next(b2, "durable")
    await advance_until(n0, lambda: "durable" in n0.channel.ops(a0) and "durable" in n0.channel.ops(a1))
    await closed(episode)
    await n0.settle()
    await n1.settle()

    (manifest,) = committed(n0)
    assert manifest["name"] == run_checkpoint_name(RUN, 90) and manifest["nodes"] == 2
    assert len(manifest["files"]) == 4 and manifest["request_id"] == episode.request_id
    assert n0.coordinator.phase is Phase.COMPLETED and episode.lost() == []


class Recorder:
    """A sink that keeps what it is handed (the ledger and the webhook are sinks like it)."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[SessionEvent] = []
        self.changed = asyncio.Event()

    async def handle(self, event: SessionEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def first(self, kind: SessionEventKind) -> SessionEvent:
        async with asyncio.timeout(WAIT_S):
            while not (found := [e for e in self.events if e.kind is kind]):
                self.changed.clear()
                await self.changed.wait()
        return found[0]

    def dropped(self, event: SessionEvent) -> None:
        raise AssertionError(f"dropped {event}")

    async def close(self) -> None:
        pass


async def test_a_node_that_never_commits_its_part_leaves_no_checkpoint_and_the_episode_stopped(make):
    """Node 1 never writes its part (its daemon died): node 0 keeps waiting until the notice's own time, then tells its ranks the step is not restorable; no global manifest, LATEST untouched, the episode Stopped naming why, and the sinks (ledger, webhook) hear upload_failed as for a single trainer's commit."""
    recorder = Recorder()
    h = make(checkpoint="node0", sinks=Sinks(sinks=[recorder]))
    a0, a1 = rank(h, 0, world=4), rank(h, 1, world=4)
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=60))
    assert episode is not None
    await save(h, a0, 12, episode.request_id)
    await save(h, a1, 12, episode.request_id)
    error = await _advance_for(h, a0, "error")
    await closed(episode)
    await h.settle()

    assert "node(s) [1] did not commit theirs" in error["message"] and "journalctl" in error["message"]
    assert committed(h) == [] and not (h.store_root / "test-job" / "LATEST").exists()
    parts = list((h.store_root / "test-job" / "checkpoints").glob("*/parts/node-0.json"))
    assert len(parts) == 1  # node 0's own part is there, and means nothing alone
    assert h.coordinator.phase is Phase.STOPPED
    assert any("did not commit theirs" in line for line in episode.lost())
    assert h.metric("spotd_upload_failures_total") == 1
    failed = await recorder.first(SessionEventKind.UPLOAD_FAILED)
    assert failed.data["step"] == 12 and "did not commit theirs" in failed.data["error"]


async def _advance_for(h: Harness, session: Session, op: str) -> dict[str, Any]:
    await advance_until(h, lambda: op in h.channel.ops(session), step_s=2.0)
    return await h.channel.next(session, op)


async def test_a_local_rank_that_never_saves_gives_the_step_up_and_tells_the_other(make):
    """Periodic saves: rank 1 never reports step 50, so nothing of it is committed and rank 0 is told why once the budget runs out; a later step both ranks save commits as usual."""
    h = make()
    r0, r1 = rank(h, 0), rank(h, 1)
    with structlog.testing.capture_logs() as logs:
        await save(h, r0, 50, None)
        (waiting,) = h.coordinator.status()["waiting_for_ranks"]
        assert waiting == {"name": run_checkpoint_name(RUN, 50), "step": 50, "missing_ranks": [1]}
        assert "waiting for rank(s) [1] to save" in render_status(h.coordinator.status())
        error = await _advance_for(h, r0, "error")
    assert "rank(s) [1] of this node never reported step 50" in error["message"]
    assert committed(h) == []
    (line,) = [e for e in logs if e["event"] == "checkpoint.part_incomplete"]
    assert line["missing_ranks"] == [1] and "fix" in line

    await save(h, r0, 100, None)
    await save(h, r1, 100, None)
    await h.channel.next(r1, "durable")
    assert [m["step"] for m in committed(h)] == [100]


async def test_a_newer_complete_step_gives_up_an_older_incomplete_one_at_once(make):
    """Rank 1 skipped step 10 (its save failed); when step 20 is complete, step 10 is given up at once, not after its budget."""
    h = make()
    r0, r1 = rank(h, 0), rank(h, 1)
    await save(h, r0, 10, None)
    await save(h, r0, 20, None)
    await save(h, r1, 20, None)
    error = await h.channel.next(r0, "error")
    assert "step 20 of the same run is complete" in error["message"]
    await h.channel.next(r0, "durable")
    assert [m["step"] for m in committed(h)] == [20]


async def test_a_shared_directory_from_local_rank_0_answers_for_the_other_ranks(make):
    """Sharded (DCP) mode: local rank 0 reports the node's directory with shared: true and rank 1 reports nothing; the step commits from it alone and the episode counts rank 1 as answered."""
    h = make()
    r0, r1 = rank(h, 0), rank(h, 1)
    episode = await h.coordinator.handle_notice(spot(h.time.wall(), in_s=120))
    assert episode is not None
    step_dir = h.checkpoint_dir / "run" / "step-000030"
    step_dir.mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
        (step_dir / name).write_bytes(b"x" * 100)
    await save(h, r0, 30, episode.request_id, path="run/step-000030", shared=True)
    await h.channel.next(r0, "durable")
    await closed(episode)
    await h.settle()
    (manifest,) = committed(h)
    assert len(manifest["files"]) == 3 and manifest["world_size"] == 2
    assert episode.lost() == [] and h.coordinator.phase is Phase.COMPLETED
    assert h.channel.ops(r1) == ["checkpoint"]  # it reported nothing, so it is told nothing


async def test_a_client_whose_placement_does_not_add_up_is_committed_per_trainer(make):
    """4 ranks cannot sit 3 to a node: the save is committed on its own, as a single trainer's, and a warning says why and what to fix."""
    h = make()
    odd = h.channel.connect("odd", rank=1, world_size=4, local_world_size=3, node_rank=0, run_id=RUN)
    with structlog.testing.capture_logs() as logs:
        await save(h, odd, 5, None)
        await h.channel.next(odd, "durable")
    (manifest,) = committed(h)
    assert manifest.get("nodes") is None and manifest["step"] == 5 and manifest["rank"] == 1
    (line,) = [e for e in logs if e["event"] == "session.placement_inconsistent"]
    assert "torchrun" in line["fix"]


async def test_a_request_to_a_multi_node_run_prices_this_nodes_share(make):
    """After a measured periodic global checkpoint of 2 nodes x 2 ranks x 8 MiB, node 0's next request prices the 16 MiB its own ranks will send, not the 32 MiB of the whole checkpoint."""
    n0, n1 = make(checkpoint="node0"), make(checkpoint="node1")
    a0, a1 = rank(n0, 0, world=4), rank(n0, 1, world=4)
    b2, b3 = rank(n1, 2, world=4), rank(n1, 3, world=4)
    for h, session in ((n0, a0), (n0, a1), (n1, b2), (n1, b3)):
        target = h.checkpoint_dir / f"run/step-000020-rank{session.rank}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(os.urandom(8 * 1024 * 1024))
        await save(h, session, 20, None)
    await n1.channel.next(b3, "durable")
    await advance_until(n0, lambda: "durable" in n0.channel.ops(a0))
    episode = await n0.coordinator.handle_notice(spot(n0.time.wall(), in_s=120))
    assert episode is not None and episode.upload is not None
    assert episode.upload.nbytes == 16 * 1024 * 1024


async def test_a_lone_resent_save_of_a_committed_step_is_answered_durable(make):
    """Rank 1's client reconnects and re-sends its save of a step both ranks already committed (it never heard durable): once its wait for rank 0 runs out, spotd finds the step committed and answers durable, not an error."""
    h = make()
    r0, r1 = rank(h, 0), rank(h, 1)
    await save(h, r0, 60, None)
    await save(h, r1, 60, None)
    await h.channel.next(r1, "durable")
    again = rank(h, 1)  # the same rank on a new connection
    with structlog.testing.capture_logs() as logs:
        await save(h, again, 60, None)
        durable = await _advance_for(h, again, "durable")
    assert durable["name"] == run_checkpoint_name(RUN, 60)
    assert "error" not in h.channel.ops(again)
    assert any(e["event"] == "checkpoint.already_committed" for e in logs)
    assert h.metric("spotd_upload_failures_total") == 0


async def test_ranks_of_a_multi_rank_run_are_welcome_to_announce_their_writes(make):
    """A rank's welcome says writing true, as a single trainer's does (store.overlap is on by default): its emergency save streams into the node part of its step (tests/daemon/test_overlap.py)."""
    h = make()
    assert h.coordinator.welcome(rank(h, 0))["writing"] is True
    assert h.coordinator.welcome(h.channel.connect("solo"))["writing"] is True
