"""The multi-node commit (issue 11), against file:// and s3:// (moto): each node's daemon uploads its ranks'
files and writes ``parts/node-<k>.json``; the global MANIFEST.json is written create-if-absent once every
part is there; LATEST only moves forward by compare-and-swap.

Two "nodes" are two store objects over the same store, each with its own checkpoint_dir, as two daemons
on two instances would be.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotd.errors import CommitError, UploadError
from spotd.store import (
    CheckpointStore,
    CommitInfo,
    Manifest,
    PartResult,
    PartState,
    Priority,
    run_checkpoint_name,
)
from spotd.store.base import BaseStore
from tests.store.helpers import JOB, Backend

RUN = "20261201T193000Z-1a2b3c"
NODES = 2
RANKS_PER_NODE = 2
WORLD = NODES * RANKS_PER_NODE


def part_info(step: int, *, request_id: str | None = None, reason: str = "periodic") -> CommitInfo:
    return CommitInfo(
        job_id=JOB,
        step=step,
        trainer="train",
        rank=None,
        world_size=WORLD,
        request_id=request_id,
        reason=reason,
        instance_id="i-node",
        final=False,
    )


@dataclass
class Node:
    """One instance: its daemon's store and its local checkpoint_dir."""

    rank: int
    store: CheckpointStore
    ckdir: Path

    @property
    def ranks(self) -> list[int]:
        return [self.rank * RANKS_PER_NODE + r for r in range(RANKS_PER_NODE)]

    def save(self, step: int) -> Path:
        """A torch.distributed.checkpoint directory as this node's ranks write it: a shard per rank, and
        .metadata from global rank 0 (on node 0) only."""
        d = self.ckdir / f"step-{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        for r in self.ranks:
            (d / f"__{r}_0.distcp").write_bytes(os.urandom(1000 + 100 * r) + f"{step}".encode())
        if self.rank == 0:
            (d / ".metadata").write_bytes(f"metadata of step {step}".encode())
        return d

    async def commit(self, step: int, **kw: Any) -> PartResult:
        source = self.save(step)
        return await self.store.commit_part(
            [source],
            checkpoint_dir=self.ckdir,
            name=run_checkpoint_name(RUN, step),
            node_rank=self.rank,
            nodes=NODES,
            ranks=self.ranks,
            info=kw.pop("info", part_info(step)),
            priority=kw.pop("priority", Priority.BACKGROUND),
            **kw,
        )


@pytest.fixture
async def nodes(backend: Backend, tmp_path: Path) -> AsyncIterator[list[Node]]:
    made = [Node(rank=k, store=backend.make(), ckdir=tmp_path / f"node{k}") for k in range(NODES)]
    try:
        yield made
    finally:
        for n in made:
            await n.store.close()


def latest(backend: Backend) -> str | None:
    body = backend.read(f"{JOB}/LATEST")
    return None if body is None else body.decode().strip()


async def test_two_nodes_committing_concurrently_make_one_global_commit(
    backend: Backend, nodes: list[Node], tmp_path: Path
) -> None:
    """Two nodes committing parts of one step at once: one global MANIFEST.json (the union of both parts, every rank), both learn it is committed, LATEST names it, and a restore brings every file back. Repeated for several steps so both interleavings (one waits / both see both parts) occur."""
    for step in (100, 200, 300, 400):
        results = await asyncio.gather(*(n.commit(step) for n in nodes))
        name = run_checkpoint_name(RUN, step)
        states = sorted(r.state.value for r in results)
        assert PartState.COMMITTED.value in states
        if backend.kind == "file":
            # os.link is atomic; moto's server checks If-None-Match and then writes without a lock, so
            # there a race could let both writes through (with identical bytes): asserted on file:// only.
            assert states.count(PartState.COMMITTED.value) == 1, states
        for n, r in zip(nodes, results, strict=True):
            assert r.part.node == n.rank and r.part.ranks == tuple(n.ranks)
            committed = r.manifest or await n.store.committed(name)
            assert committed is not None and committed.name == name
        global_keys = [k for k in backend.objects() if k.endswith(f"{name}/MANIFEST.json")]
        assert len(global_keys) == 1
        assert latest(backend) == name
    (newest, *_) = await nodes[0].store.list()
    assert newest.name == run_checkpoint_name(RUN, 400)
    assert (newest.step, newest.world_size, newest.nodes, newest.rank) == (400, WORLD, NODES, None)
    assert [f.path for f in newest.files] == [
        "step-000400/.metadata",
        *(f"step-000400/__{r}_0.distcp" for r in range(WORLD)),
    ]
    dest = tmp_path / "fresh"
    result = await nodes[1].store.restore(dest)
    assert result.manifest == newest and result.files == WORLD + 1
    for n in nodes:
        for f in (n.ckdir / "step-000400").iterdir():
            assert (dest / "step-000400" / f.name).read_bytes() == f.read_bytes()


async def test_one_node_only_leaves_nothing_listed_and_the_previous_step_restores(
    backend: Backend, nodes: list[Node], tmp_path: Path
) -> None:
    """When only node 0 commits step 500 it is WAITING for node 1: step 500 is not listed, not restored, LATEST stays at step 400, and committed() says None, until node 1's part arrives."""
    await asyncio.gather(*(n.commit(400) for n in nodes))
    alone = await nodes[0].commit(500)
    name = run_checkpoint_name(RUN, 500)
    assert alone.state is PartState.WAITING and alone.missing == (1,) and not alone.committed
    assert [m.step for m in await nodes[0].store.list()] == [400]
    assert latest(backend) == run_checkpoint_name(RUN, 400)
    assert await nodes[0].store.committed(name) is None
    assert await nodes[0].store.committed(name, nodes=NODES) is None
    result = await nodes[0].store.restore(tmp_path / "fresh")
    assert result.manifest.step == 400
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["step-000400"]

    late = await nodes[1].commit(500)

    assert late.state is PartState.COMMITTED and late.manifest is not None
    assert await nodes[0].store.committed(name) == late.manifest
    assert latest(backend) == name


async def test_a_failed_upload_leaves_no_global_commit_and_a_retry_completes_it(
    backend: Backend, nodes: list[Node], tmp_path: Path
) -> None:
    """Node 1's upload failing after some of its files went up writes no part: step 200 is not committed (step 100 still restores); a retry of node 1 writes its part and commits."""
    await asyncio.gather(*(n.commit(100) for n in nodes))
    first = await nodes[0].commit(200)
    assert first.state is PartState.WAITING
    broken = nodes[1].store
    assert isinstance(broken, BaseStore)
    real = type(broken)
    sent: list[str] = []

    class FailsSecondFile(real):  # type: ignore[misc, valid-type]
        __slots__ = ()

        async def upload_file(self, file: Any, key: str, priority: Any, progress: Any, **kw: Any) -> str:
            if sent:
                raise UploadError(f"upload {file.rel} failed after 3 tries: injected")
            sent.append(key)
            return await super().upload_file(file, key, priority, progress, **kw)

    broken.__class__ = FailsSecondFile
    try:
        with pytest.raises(UploadError, match="injected"):
            await nodes[1].commit(200)
    finally:
        broken.__class__ = real
    name = run_checkpoint_name(RUN, 200)
    assert sent and not [k for k in backend.objects() if "/parts/node-1" in k and name in k]
    assert await nodes[0].store.committed(name, nodes=NODES) is None
    assert [m.step for m in await nodes[0].store.list()] == [100]
    assert (await nodes[0].store.restore(tmp_path / "fresh")).manifest.step == 100

    retry = await nodes[1].commit(200)

    assert retry.state is PartState.COMMITTED
    assert [m.step for m in await nodes[0].store.list()] == [200, 100]


async def test_committed_finishes_a_commit_whose_last_node_died_after_its_part(
    backend: Backend, nodes: list[Node]
) -> None:
    """Every part there but no global manifest (the last node died between its part and the commit): committed(name, nodes=N) on another node commits it and moves LATEST; without nodes it only looks."""
    await asyncio.gather(*(n.commit(100) for n in nodes))
    await asyncio.gather(*(n.commit(200) for n in nodes))
    name = run_checkpoint_name(RUN, 200)
    backend.delete(f"{JOB}/checkpoints/{name}/MANIFEST.json")
    backend.delete(f"{JOB}/LATEST")
    assert await nodes[0].store.committed(name) is None

    found = await nodes[0].store.committed(name, nodes=NODES)

    assert found is not None and found.step == 200 and found.nodes == NODES
    assert latest(backend) == name
    assert [m.step for m in await nodes[1].store.list()] == [200, 100]


async def test_a_retried_part_is_idempotent_and_another_shape_refused(
    backend: Backend, nodes: list[Node]
) -> None:
    """Node 0 committing the same part again finds its own part (ALREADY_COMMITTED once the step is committed); a part of other ranks for the same node is refused, and neither touches what is stored."""
    await asyncio.gather(*(n.commit(100) for n in nodes))
    name = run_checkpoint_name(RUN, 100)
    key = f"{JOB}/checkpoints/{name}/parts/node-0.json"
    before = {k: backend.read(k) for k in backend.objects()}
    same = await nodes[0].store.commit_part(
        [nodes[0].ckdir / "step-000100"],
        checkpoint_dir=nodes[0].ckdir,
        name=name,
        node_rank=0,
        nodes=NODES,
        ranks=nodes[0].ranks,
        info=part_info(100),
    )
    assert same.state is PartState.ALREADY_COMMITTED and backend.read(key) == before[key]
    with pytest.raises(CommitError, match="already exists with other content"):
        await nodes[0].store.commit_part(
            [nodes[0].ckdir / "step-000100"],
            checkpoint_dir=nodes[0].ckdir,
            name=name,
            node_rank=0,
            nodes=NODES,
            ranks=[*nodes[0].ranks, 7],
            info=part_info(100),
        )
    assert {k: backend.read(k) for k in backend.objects()} == before


@pytest.mark.parametrize("when", ["committed", "part-stored"])
async def test_a_step_saved_again_with_other_bytes_never_changes_what_is_stored(
    backend: Backend, nodes: list[Node], tmp_path: Path, when: str
) -> None:
    """A step's name is the same for every save of it, so a second save of step 100 (a re-sent save, a retry; here other random bytes) once the step is committed, or once this node's part is stored and the other node's not yet, sends nothing and writes over nothing: the first save is what is committed and restored, byte for byte (it used to be sent again over the listed objects, and the restore then failed its checksums)."""
    name = run_checkpoint_name(RUN, 100)
    if when == "committed":
        await asyncio.gather(*(n.commit(100) for n in nodes))
    else:
        assert (await nodes[0].commit(100)).state is PartState.WAITING
    first = {f.name: f.read_bytes() for f in (nodes[0].ckdir / "step-000100").iterdir()}
    stored = {k: backend.read(k) for k in backend.objects()}

    again = await nodes[0].commit(100)  # new random shards under the same step

    assert {k: backend.read(k) for k in backend.objects()} == stored
    assert again.part.node == 0 and again.part.ranks == tuple(nodes[0].ranks)
    if when == "committed":
        assert again.state is PartState.ALREADY_COMMITTED and again.manifest is not None
    else:
        assert again.state is PartState.WAITING and again.missing == (1,)
        assert (await nodes[1].commit(100)).state is PartState.COMMITTED
    result = await nodes[1].store.restore(tmp_path / "fresh")
    assert result.manifest.name == name
    for fname, data in first.items():
        assert (tmp_path / "fresh" / "step-000100" / fname).read_bytes() == data


async def test_stored_says_whether_a_save_would_meet_durable_files(
    backend: Backend, nodes: list[Node]
) -> None:
    """stored(name), which the daemon asks before streaming a rank's emergency save under a step's name:
    False before any node's part, True once one part is there (not yet committed), and once committed."""
    name = run_checkpoint_name(RUN, 100)
    assert await nodes[1].store.stored(name) is False
    assert (await nodes[0].commit(100)).state is PartState.WAITING
    assert await nodes[1].store.committed(name) is None
    assert await nodes[1].store.stored(name) is True
    await nodes[1].commit(100)
    assert await nodes[0].store.stored(name) is True


async def test_parts_that_do_not_make_one_checkpoint_are_never_committed(
    backend: Backend, nodes: list[Node]
) -> None:
    """Node 1 saving another step's files under the same name, or claiming node 0's ranks, is a CommitError naming the problem; no MANIFEST.json is written."""
    await nodes[0].commit(100)
    with pytest.raises(CommitError, match="node 1 saved step 101"):
        await nodes[1].commit(100, info=part_info(101))
    name = run_checkpoint_name(RUN, 100)
    assert not [k for k in backend.objects() if k.endswith(f"{name}/MANIFEST.json")]
    assert await nodes[0].store.list() == []


async def test_a_stale_writer_cannot_move_latest_back(backend: Backend, nodes: list[Node]) -> None:
    """A writer that read LATEST (step 100) just before another node moved it to step 300 fails its compare-and-swap, reads again, and leaves LATEST at step 300 rather than writing its older step 200."""
    await asyncio.gather(*(n.commit(100) for n in nodes))
    slow = nodes[0].store
    assert isinstance(slow, BaseStore)
    real = type(slow)
    other = nodes[1]
    reads: list[str] = []

    class ReadsThenLoses(real):  # type: ignore[misc, valid-type]
        __slots__ = ()

        async def get_tagged(self, key: str) -> Any:
            got = await super().get_tagged(key)
            if key.endswith("/LATEST") and not reads:
                reads.append(got.data.decode().strip())
                # Between this read and the write it would make, step 300 commits everywhere.
                await asyncio.gather(*(n.commit(300) for n in (nodes[0], other)))
            return got

    assert (await other.commit(200)).state is PartState.WAITING
    slow.__class__ = ReadsThenLoses
    try:
        result = await nodes[0].commit(200)
    finally:
        slow.__class__ = real

    assert reads == [run_checkpoint_name(RUN, 100)]
    assert result.state is PartState.COMMITTED
    assert latest(backend) == run_checkpoint_name(RUN, 300)


async def test_retention_keeps_keep_global_commits_and_removes_old_orphan_parts(
    backend: Backend, tmp_path: Path
) -> None:
    """With keep=2: the two newest global commits stay; older ones go, and so do the parts of a step that never committed once older than every kept commit; a newer step still waiting is left alone."""
    made = [Node(rank=k, store=backend.make(**{"store.keep": 2}), ckdir=tmp_path / f"n{k}") for k in range(2)]
    try:
        await asyncio.gather(*(n.commit(100) for n in made))
        await made[0].commit(200)  # node 1 never comes: an orphan
        for step in (300, 400, 500):
            await asyncio.gather(*(n.commit(step) for n in made))
        await made[0].commit(600)  # waiting, newer than every commit
    finally:
        for n in made:
            await n.store.close()
    names = {k.split("/")[2] for k in backend.objects() if "/checkpoints/" in k}
    assert names == {run_checkpoint_name(RUN, s) for s in (400, 500, 600)}


async def test_multi_node_checkpoints_sit_beside_single_and_per_rank_ones(
    backend: Backend, nodes: list[Node], tmp_path: Path
) -> None:
    """A single-process commit, a per-rank set and a multi-node commit in one store: each is listed, a named restore brings each back, and the newest (by name) is what a plain restore picks."""
    src = tmp_path / "single"
    src.mkdir()
    (src / "model.pt").write_bytes(b"single")
    store = nodes[0].store
    single = await store.commit(src / "model.pt", checkpoint_dir=src, info=part_info(1, reason="single"))
    per_rank: list[Manifest] = []
    for r in (0, 1):
        (src / f"r{r}.pt").write_bytes(f"rank {r}".encode())
        per_rank.append(
            await store.commit(
                src / f"r{r}.pt",
                checkpoint_dir=src,
                info=CommitInfo(
                    job_id=JOB,
                    step=2,
                    trainer="train",
                    rank=r,
                    world_size=2,
                    request_id=None,
                    reason="periodic",
                    instance_id="i-1",
                    final=False,
                ),
            )
        )
    # A run that starts later than those commits names its checkpoints after its own start.
    late_run = "29991231T000000Z-ffffff"
    await asyncio.gather(
        *(
            n.store.commit_part(
                [n.save(3)],
                checkpoint_dir=n.ckdir,
                name=run_checkpoint_name(late_run, 3),
                node_rank=n.rank,
                nodes=NODES,
                ranks=n.ranks,
                info=part_info(3),
            )
            for n in nodes
        )
    )
    listed = await store.list()
    assert {m.name for m in listed} == {
        single.name,
        *(m.name for m in per_rank),
        run_checkpoint_name(late_run, 3),
    }
    newest = await store.restore(tmp_path / "a")
    assert newest.manifest.nodes == NODES and newest.files == WORLD + 1
    assert (await store.restore(tmp_path / "b", name=single.name)).manifest == single
    assert (tmp_path / "b" / "model.pt").read_bytes() == b"single"
    again = await store.restore(tmp_path / "c", name=per_rank[1].name)
    assert again.manifest == per_rank[1]


@pytest.mark.timeout(120)
async def test_a_daemon_killed_during_its_upload_leaves_no_global_commit(
    backend: Backend, nodes: list[Node], tmp_path: Path
) -> None:
    """Node 1's process is SIGKILLed while uploading its part of step 200: no part of node 1, no global commit of step 200 (even when node 0 asks with nodes=2), and step 100 is what restores."""
    await asyncio.gather(*(n.commit(100) for n in nodes))
    waiting = await nodes[0].commit(200)
    assert waiting.state is PartState.WAITING
    ckdir = tmp_path / "dying"
    source = ckdir / "step-000200"
    source.mkdir(parents=True)
    (source / "__2_0.distcp").write_bytes(os.urandom(24 * 1024 * 1024))
    (source / "__3_0.distcp").write_bytes(os.urandom(24 * 1024 * 1024))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.store.part_driver",
        json.dumps(
            {
                "uri": backend.uri,
                "endpoint_url": backend.bucket.endpoint_url if backend.bucket else "",
                "job_id": JOB,
                "checkpoint_dir": str(ckdir),
                "source": str(source),
                "name": run_checkpoint_name(RUN, 200),
                "node_rank": 1,
                "nodes": NODES,
                "ranks": [2, 3],
                "world_size": WORLD,
                "step": 200,
            }
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        line = await proc.stdout.readline()
    proc.kill()
    await proc.wait()
    assert line == b"uploading\n"
    name = run_checkpoint_name(RUN, 200)
    assert not [k for k in backend.objects() if name in k and "/parts/node-1" in k]
    assert await nodes[0].store.committed(name, nodes=NODES) is None
    assert [m.step for m in await nodes[0].store.list()] == [100]
    restored = await nodes[0].store.restore(tmp_path / "fresh")
    assert restored.manifest.step == 100


async def test_s3_409_on_the_global_manifest_and_latest_is_read_again(
    s3_bucket: Any, s3_proxy: Any, tmp_path: Path
) -> None:
    """S3 answers a conditional write that meets another under way with 409 ConditionalRequestConflict (botocore does not retry it): the store reads the key again and writes again, so the commit and LATEST still land (one node, two ranks: nodes=1)."""
    from spotd.store.s3 import S3Store

    store = S3Store(
        uri=s3_bucket.uri(), job_id=JOB, endpoint_url=s3_proxy.endpoint_url, part_size=5 * 1024 * 1024
    )
    node = Node(rank=0, store=store, ckdir=tmp_path / "n0")

    async def commit_alone(step: int) -> PartResult:
        return await store.commit_part(
            [node.save(step)],
            checkpoint_dir=node.ckdir,
            name=run_checkpoint_name(RUN, step),
            node_rank=0,
            nodes=1,
            ranks=[0, 1],
            info=CommitInfo(**{**_fields(part_info(step)), "world_size": 2}),
        )

    try:
        assert (await commit_alone(50)).state is PartState.COMMITTED  # LATEST is there: next is If-Match
        s3_proxy.add("409", method="PUT", path_has="/MANIFEST.json")
        s3_proxy.add("409", method="PUT", path_has="/LATEST")
        result = await commit_alone(60)
    finally:
        await store.close()
    name = run_checkpoint_name(RUN, 60)
    assert [a for a, _, _ in s3_proxy.log] == ["409", "409"]
    assert result.state is PartState.COMMITTED
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"pfx/{JOB}/LATEST")["Body"].read()
    assert body.decode().strip() == name


def _fields(info: CommitInfo) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(info, f.name) for f in fields(info)}


async def test_retention_deletes_an_orphans_parts_before_its_data(backend: Backend, tmp_path: Path) -> None:
    """An orphan step's parts are deleted in a call of their own before its data files, so a node committing it concurrently finds a part missing instead of committing files being deleted."""
    made = [Node(rank=k, store=backend.make(**{"store.keep": 1}), ckdir=tmp_path / f"n{k}") for k in range(2)]
    try:
        await made[0].commit(100)  # never completed: node 1 never comes
        calls: list[list[str]] = []
        real = type(made[0].store)

        class Records(real):  # type: ignore[misc, valid-type]
            __slots__ = ()

            async def delete_keys(self, keys: Any) -> None:
                calls.append(list(keys))
                await super().delete_keys(keys)

        for n in made:
            n.store.__class__ = Records
        try:
            await asyncio.gather(*(n.commit(200) for n in made))  # the committer's retention removes 100
        finally:
            for n in made:
                n.store.__class__ = real
    finally:
        for n in made:
            await n.store.close()
    orphan = run_checkpoint_name(RUN, 100)
    mine = [c for c in calls if any(orphan in k for k in c)]
    assert mine and all(k.endswith("/parts/node-0.json") for k in mine[0])
    assert any(k.endswith(".distcp") for c in mine[1:] for k in c)


async def test_one_node_with_two_ranks_commits_at_once_from_one_source_per_rank(
    backend: Backend, store: CheckpointStore, ckdir: Path, tmp_path: Path
) -> None:
    """A single instance with two ranks (nodes=1): each rank's own saved file is a source, the part covers both ranks, the call commits globally, and a restore brings both files back."""
    for r in (0, 1):
        (ckdir / f"step-7-rank{r}.pt").write_bytes(f"rank {r}".encode())
    result = await store.commit_part(
        [ckdir / "step-7-rank0.pt", ckdir / "step-7-rank1.pt"],
        checkpoint_dir=ckdir,
        name=run_checkpoint_name(RUN, 7),
        node_rank=0,
        nodes=1,
        ranks=[1, 0],
        info=CommitInfo(**{**_fields(part_info(7)), "world_size": 2}),
        priority=Priority.EMERGENCY,
    )
    assert result.state is PartState.COMMITTED and result.part.ranks == (0, 1)
    assert result.manifest is not None and [f.path for f in result.manifest.files] == [
        "step-7-rank0.pt",
        "step-7-rank1.pt",
    ]
    restored = await store.restore(tmp_path / "fresh")
    assert restored.manifest == result.manifest
    assert (tmp_path / "fresh" / "step-7-rank1.pt").read_bytes() == b"rank 1"
